"""Quantized classes derived at run time from transformers classes (one per original class)."""

from __future__ import annotations

from typing import Any

_DERIVED: dict[tuple[type, type], type] = {}


def quantized_subclass(mixin: type, original: type, module: str, doc: str, **attrs: Any) -> type:
    """``Quant<Name>(mixin, original)``, created once per (mixin, original) pair and then reused.

    ``module`` is the ``__module__`` the class reports (the module that defines ``mixin``), ``doc``
    its docstring, ``attrs`` extra class attributes.
    """
    key = (mixin, original)
    if key not in _DERIVED:
        name = f"Quant{original.__name__}"
        namespace = {"__module__": module, "__qualname__": name, "__doc__": doc, **attrs}
        _DERIVED[key] = type(name, (mixin, original), namespace)
    return _DERIVED[key]

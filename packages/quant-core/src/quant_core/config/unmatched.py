"""``quant_cfg`` entries that select nothing: an unknown ``parent_class`` is an error, a pattern that
matches no quantizer of the model gets one :class:`QuantWarning` listing them all.

Built-in configs (every config made read-only by :func:`quant_core.config.frozen.freeze`, in any
package) carry patterns meant for many model families (``*lm_head*``, ``*router*``, KV-cache
``*[kv]_bmm_quantizer`` ...) that legitimately match nothing on a given model; their
``(pattern, parent_class)`` pairs are remembered here and never reported, also in a user's copy.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import nn

from quant_core.diagnostics import warn

__all__ = ["check_parent_classes", "remember_builtin", "warn_unmatched"]

_BUILTIN: set[tuple[str, str | None]] = set()


def remember_builtin(quant_cfg: Any) -> None:
    """Record the ``(pattern, parent_class)`` pairs of a built-in config's ``quant_cfg``."""
    from quant_core.config.helpers import entry_dicts

    for entry in entry_dicts(quant_cfg):
        name = entry.get("quantizer_name")
        if isinstance(name, str):
            _BUILTIN.add(("*" if name == "default" else name, entry.get("parent_class")))


def _module_classes() -> dict[str, type]:
    """Every ``nn.Module`` subclass defined so far, by bare name and by ``nn.``-prefixed name for torch.nn's."""
    out: dict[str, type] = {}
    todo = [nn.Module]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        out.setdefault(cls.__name__, cls)
        if cls.__module__.startswith("torch.nn"):
            out[f"nn.{cls.__name__}"] = cls
    return out


def check_parent_classes(entries: Iterable[Any]) -> None:
    """Refuse an entry whose ``parent_class`` names no module class at all (a typo such as ``nn.Linearr``)."""
    classes = None
    for entry in entries:
        parent = entry.parent_class
        if parent is None:
            continue
        classes = classes if classes is not None else _module_classes()
        if parent in classes or parent.removeprefix("nn.") in classes:
            continue
        close = difflib.get_close_matches(parent, list(classes), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"quant_cfg entry {entry.quantizer_name!r} has parent_class {parent!r}, which is not the "
            f"name of any module class (torch.nn classes are written 'nn.Linear'){hint}"
        )


def warn_unmatched(entries: list[Any], matched: set[int], model: nn.Module) -> None:
    """One warning naming the user's entries (not built-in patterns) that matched no quantizer of ``model``."""
    missed = []
    for i, entry in enumerate(entries):
        name = entry.quantizer_name
        if i in matched or not isinstance(name, str) or (name, entry.parent_class) in _BUILTIN:
            continue
        missed.append(
            repr(name) + (f" (parent_class {entry.parent_class!r})" if entry.parent_class else "")
        )
    if missed:
        warn(
            f"quant_cfg pattern(s) {', '.join(missed)} matched no quantizer of "
            f"{type(model).__name__}, so they changed nothing. Quantizer names look like "
            "'<module name>.weight_quantizer' / '.input_quantizer' / '.output_quantizer' (see "
            "mtq.print_quant_summary); check the spelling.",
            stacklevel=4,
        )

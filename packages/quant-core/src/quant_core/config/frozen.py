"""Read-only containers for the built-in configs, so editing a copy never changes the constant.

The guide edits a built-in config as ``config = mtq.INT8_DEFAULT_CFG.copy()`` followed by
``config["quant_cfg"][pattern] = ...``. A plain ``dict.copy()`` is shallow, so that edit would
change ``quant_cfg`` of the module-level constant for every later user. Here ``.copy()`` (and
``copy.copy`` / ``copy.deepcopy``) of a built-in config returns a deep, ordinary, mutable copy,
and writing into the constant itself raises a ``TypeError`` that says how to copy it.
"""

from __future__ import annotations

from typing import Any, NoReturn


def thaw(value: Any) -> Any:
    """Deep-copy a (possibly frozen) config value into plain mutable dicts and lists."""
    from quant_core.config.entry_list import QuantCfgList

    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, QuantCfgList):
        return QuantCfgList(thaw(v) for v in value)
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value


def _read_only(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(
        "built-in quantization configs are read-only; edit a copy: "
        "config = mtq.INT8_DEFAULT_CFG.copy()  (a deep copy) or copy.deepcopy(...)"
    )


class FrozenDict(dict):
    """A dict that refuses in-place edits; ``copy()`` returns a deep mutable copy."""

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        """A deep, ordinary, mutable copy (so edits never reach the built-in constant)."""
        return thaw(self)

    def __copy__(self) -> dict[str, Any]:
        return thaw(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return thaw(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (thaw(self),))


class FrozenList(list):
    """A list that refuses in-place edits; copies are plain lists."""

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = (
        __iadd__
    ) = __imul__ = _read_only

    def copy(self) -> list[Any]:  # type: ignore[override]
        """A deep, ordinary, mutable copy."""
        return thaw(self)

    def __copy__(self) -> list[Any]:
        return thaw(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return thaw(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (thaw(self),))


def freeze(value: Any) -> Any:
    """Recursively turn dicts and lists into their read-only counterparts."""
    from quant_core.config.entry_list import FrozenQuantCfgList, QuantCfgList

    if isinstance(value, QuantCfgList):
        return FrozenQuantCfgList(freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value

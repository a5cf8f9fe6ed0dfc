"""Read-only containers for the built-in configs, so editing a copy never changes the constant.

The guide edits a built-in config as ``config = mtq.INT8_DEFAULT_CFG.copy()`` followed by
``config["quant_cfg"][pattern] = ...``. A plain ``dict.copy()`` is shallow, so that edit would
change ``quant_cfg`` of the module-level constant for every later user. Here ``.copy()`` (and
``copy.copy`` / ``copy.deepcopy``) of a built-in config returns a deep, ordinary, mutable copy,
and writing into the constant itself raises a ``TypeError`` that says how to copy it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, NoReturn


def thaw(value: Any) -> Any:
    """Deep-copy a (possibly frozen) config value into plain mutable dicts and lists."""
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
    """Recursively turn dicts and lists into their read-only counterparts.

    A config (a dict with ``quant_cfg``) frozen here is a built-in one: its patterns are remembered
    so that those matching nothing on a model are not reported (:mod:`quant_core.config.unmatched`).
    """
    if isinstance(value, dict) and "quant_cfg" in value:
        from quant_core.config.unmatched import remember_builtin

        remember_builtin(value["quant_cfg"])
    if isinstance(value, QuantCfgList):
        return FrozenQuantCfgList(freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


# ----- quant_cfg as an entry list ------------------------------------------------------------------
class EntryView(MutableMapping):
    """One entry seen as the dict shape's ``{**cfg, "enable": ...}`` value; edits write through to the entry."""

    def __init__(self, entry: dict[str, Any]):
        self._entry = entry

    def _flat(self) -> dict[str, Any]:
        out = dict(self._entry.get("cfg") or {})
        if "enable" in self._entry:
            out["enable"] = self._entry["enable"]
        return out

    def __getitem__(self, key: str) -> Any:
        return self._flat()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "enable":
            self._entry["enable"] = value
        elif self._entry.get("cfg") is None:
            self._entry["cfg"] = {key: value}
        else:
            self._entry["cfg"][key] = value

    def __delitem__(self, key: str) -> None:
        if key == "enable" and "enable" in self._entry:
            del self._entry["enable"]
        else:
            del (self._entry.get("cfg") or {})[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())

    def __repr__(self) -> str:
        return repr(self._flat())


def _value(entry: dict[str, Any]) -> Any:
    """An entry as the value the dict shape held for its pattern (a live view, or the cfg list)."""
    cfg = entry.get("cfg")
    return cfg if isinstance(cfg, list) else EntryView(entry)


def _key(entry: Mapping[str, Any], index: int) -> str:
    name = entry.get("quantizer_name")
    return "default" if name == "*" and index == 0 and not entry.get("parent_class") else name


class QuantCfgList(list):
    """A ``quant_cfg`` entry list that also supports the dict shape's edits by pattern."""

    def _find(self, name: str, parent: str | None, key: str | None = None) -> int | None:
        """Index of the last entry for (name, parent); ``"default"`` is only a leading ``"*"``, ``"*"`` never is."""
        key = name if key is None else key
        hits = [
            i
            for i, e in enumerate(self)
            if isinstance(e, Mapping)
            and e.get("quantizer_name") == name
            and e.get("parent_class") == parent
            and (parent is not None or (_key(e, i) == "default") == (key == "default"))
        ]
        return hits[-1] if hits else None

    def _entries_for(self, key: str, value: Any) -> list[dict[str, Any]]:
        from quant_core.config.helpers import entry_dicts

        return entry_dicts({key: value})

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(key, str):
            return super().__setitem__(key, value)
        for entry in self._entries_for(key, value):
            at = self._find(entry["quantizer_name"], entry.get("parent_class"), key)
            if at is not None:
                super().__setitem__(at, entry)
            elif key == "default":
                self.insert(0, entry)
            else:
                self.append(entry)
        return None

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, str):
            return super().__getitem__(key)
        if key.startswith("nn."):
            scoped = {e["quantizer_name"]: _value(e) for e in self if e.get("parent_class") == key}
            if scoped:
                return scoped
        else:
            at = self._find("*" if key == "default" else key, None, key)
            if at is not None:
                return _value(super().__getitem__(at))
        raise KeyError(key)

    def __delitem__(self, key: Any) -> None:
        if not isinstance(key, str):
            return super().__delitem__(key)
        self[key]  # KeyError when absent
        keep = [
            e
            for i, e in enumerate(self)
            if not (
                (key.startswith("nn.") and e.get("parent_class") == key)
                or (_key(e, i) == key and not e.get("parent_class"))
            )
        ]
        super().__setitem__(slice(None), keep)
        return None

    def __contains__(self, key: Any) -> bool:
        if isinstance(key, str):
            return self.get(key) is not None
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        """The dict-shape value of ``key`` (a pattern, ``"default"`` or ``"nn.Class"``), or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def pop(self, key: Any = -1, *default: Any) -> Any:  # type: ignore[override]
        """By index as a list does; by pattern as a dict does."""
        if not isinstance(key, str):
            return super().pop(key)
        if key not in self and default:
            return default[0]
        value = self[key]
        del self[key]
        return value

    def keys(self) -> list[str]:
        """The patterns in order (``"nn.Class"`` for parent-class entries, ``"default"`` for a leading ``"*"``)."""
        return list(dict(self.items()))

    def items(self) -> Iterator[tuple[str, Any]]:
        """(pattern, dict-shape value) pairs, as the dict shape gave them."""
        seen: set[str] = set()
        for i, e in enumerate(self):
            parent = e.get("parent_class")
            if parent:
                if parent not in seen:
                    seen.add(parent)
                    yield parent, self[parent]
            else:
                yield _key(e, i), _value(e)

    def values(self) -> list[Any]:
        """The dict-shape values in order."""
        return [v for _k, v in self.items()]

    def update(self, other: Mapping[str, Any] = (), **kwargs: Any) -> None:
        """Assign each pattern of ``other`` (and ``kwargs``) as ``quant_cfg[pattern] = value``."""
        for key, value in [*dict(other).items(), *kwargs.items()]:
            self[key] = value


class FrozenQuantCfgList(FrozenList, QuantCfgList):
    """A built-in config's read-only entry list; ``copy()`` gives a mutable :class:`QuantCfgList`."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (QuantCfgList, (thaw(self),))

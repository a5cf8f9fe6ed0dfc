"""Read-as-dict access for the typed config models (ModelOpt's configs answer ``entry["cfg"]``)."""

from __future__ import annotations

from typing import Any

__all__ = ["MappingAccess"]


class MappingAccess:
    """ModelOpt's configs also read like dicts: ``entry["cfg"]``, ``entry.get(...)``, ``in``."""

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:  # type: ignore[attr-defined]
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key``, or ``default`` when there is no such field."""
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields  # type: ignore[attr-defined]

    def keys(self) -> list[str]:
        """The field names."""
        return list(type(self).model_fields)  # type: ignore[attr-defined]

    def values(self) -> list[Any]:
        """The field values, in field order."""
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        """(field name, value) pairs, in field order."""
        return [(k, getattr(self, k)) for k in self.keys()]

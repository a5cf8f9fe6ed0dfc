"""What quant tells a user about a result that is probably not what they meant.

Every such warning is a :class:`QuantWarning` (a ``UserWarning``), so it can be filtered, turned
into an error in tests (``-W error::quant_core.QuantWarning``) or silenced as one category.
"""

from __future__ import annotations

import warnings


class QuantWarning(UserWarning):
    """A probably-wrong result: a pattern matching nothing, a degenerate statistic, a setting ignored."""


def name_list(names: list[str], limit: int = 5, sep: str = ", ") -> str:
    """``names`` for a message: the first ``limit`` joined by ``sep``, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return sep.join(names[:limit]) + more


def warn(message: str, stacklevel: int = 2) -> None:
    """Emit ``message`` as a :class:`QuantWarning` attributed to the caller's caller."""
    warnings.warn(message, QuantWarning, stacklevel=stacklevel + 1)


__all__ = ["QuantWarning", "name_list", "warn"]

"""The search state (a plain, JSON-serialisable dict) and the replay config built from it.

``search_state`` keys: ``candidates`` (names), ``candidate_bits`` (bits per weight of each, per
layer), ``layers`` (name -> {"params", "group"}), ``groups`` (key -> layer names), ``scores``
(group -> score per candidate), ``method``, ``constraints``, ``choice`` (layer -> candidate name),
``effective_bits`` and ``weight_bytes`` achieved, ``config`` (the replay config) and ``best``
(ModelOpt's summary: ``recipe``, ``constraints``, ``score``, ``is_satisfied``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from quant_core.config.frozen import thaw
from quant_core.conversion import iter_quantizers
from quant_core.nn import SequentialQuantizer, TensorQuantizer


def _attrs(q: nn.Module) -> Any:
    if isinstance(q, SequentialQuantizer):
        return [_attrs(stage) for stage in q]
    assert isinstance(q, TensorQuantizer)
    return q.attribute_config.model_dump(exclude_defaults=True) | {"enable": q.is_enabled}


def quantizer_settings(module: nn.Module | None) -> dict[str, Any] | None:
    """A candidate layer's quantizer attributes by quantizer name (None for the unquantized candidate).

    Read before scoring folds the candidates' weights, which turns their weight quantizers off.
    """
    if module is None:
        return None
    return {qname: _attrs(q) for qname, q, _parent in iter_quantizers(module)}


def replay_config(
    chosen: dict[str, dict[str, Any] | None], algorithms: list[Any]
) -> dict[str, Any]:
    """A plain config quantizing each chosen layer as its candidate did (``quantizer_settings``), rest off."""
    quant_cfg: dict[str, Any] = {"*": {"enable": False}}
    for name, settings in chosen.items():
        for qname, attrs in (settings or {}).items():
            quant_cfg[f"{name}.{qname}"] = attrs
    distinct: list[Any] = []
    for algo in algorithms:
        algo = thaw(algo)  # a built-in config's algorithm is read-only: the state holds plain data
        if algo is not None and algo not in distinct:
            distinct.append(algo)
    return {
        "quant_cfg": quant_cfg,
        "algorithm": distinct[0] if len(distinct) == 1 else (distinct or None),
    }


def get_auto_quantize_config(search_state: dict[str, Any]) -> dict[str, Any]:
    """The config that reproduces the searched model with ``mtq.quantize(model, config, forward_loop)``."""
    if "config" not in search_state:
        raise ValueError("search_state has no 'config'; pass the state returned by auto_quantize")
    return search_state["config"]


_CHECKPOINT_KIND = "quant auto_quantize scores"


def save_scores(
    path: str | os.PathLike[str],
    candidates: list[str],
    groups: dict[str, list[str]],
    method: str,
    scores: dict[str, list[float]],
) -> None:
    """Write the search's per-group scores to ``path`` as JSON (no pickled objects)."""
    payload = {
        "kind": _CHECKPOINT_KIND,
        "candidates": candidates,
        "groups": groups,
        "method": method,
        "scores": scores,
    }
    Path(path).write_text(json.dumps(payload), encoding="utf-8")


def load_scores(
    path: str | os.PathLike[str],
    candidates: list[str],
    groups: dict[str, list[str]],
    method: str,
) -> dict[str, list[float]] | None:
    """The per-group scores saved at ``path`` for this search, or None when there is no file.

    A file written for other candidates, groups or method (or not by ``auto_quantize``) is refused
    by name rather than silently reused or overwritten.
    """
    file = Path(path)
    if not file.exists():
        return None
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"auto_quantize checkpoint {file} is not a search-state file: {err}"
        ) from None
    if not isinstance(payload, dict) or payload.get("kind") != _CHECKPOINT_KIND:
        raise ValueError(f"auto_quantize checkpoint {file} was not written by auto_quantize")
    mismatched = [
        key
        for key, value in (("candidates", candidates), ("groups", groups), ("method", method))
        if payload.get(key) != value
    ]
    if mismatched:
        raise ValueError(
            f"auto_quantize checkpoint {file} was written for other {', '.join(mismatched)}; "
            "delete it or pass another path"
        )
    return payload["scores"]

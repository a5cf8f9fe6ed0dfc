"""The search state (a plain, JSON-serialisable dict) and the replay config built from it.

``search_state`` keys: ``candidates`` (names), ``candidate_bits`` (bits per weight of each, per
layer), ``layers`` (name -> {"params", "group"}), ``groups`` (key -> layer names), ``scores``
(group -> score per candidate), ``method``, ``constraints``, ``choice`` (layer -> candidate name),
``effective_bits`` and ``weight_bytes`` achieved, ``config`` (the replay config) and ``best``
(ModelOpt's summary: ``recipe``, ``constraints``, ``score``, ``is_satisfied``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

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

"""The ``max`` algorithm: amax from the weights and the running max of activations, with the
per-token fallback for inputs that static per-tensor scaling serves badly."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from quant_core.algorithms.per_token_fallback import (
    check_min_gain_db,
    per_token_fallback,
    sample_inputs,
    static_per_tensor_inputs,
)
from quant_core.algorithms.registry import ForwardLoop, register_algorithm
from quant_core.algorithms.statistics import max_calibrate
from quant_core.algorithms.weights import weight_layers
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "PER_TOKEN_FALLBACK_DB",
    "max_algorithm",
    "needs_activation_forward",
    "share_weight_global_amax",
]


PER_TOKEN_FALLBACK_DB = 9.0
"""Default gain (dB) of per-token over per-tensor static input scaling above which ``max`` switches."""


@register_algorithm("max")
def max_algorithm(
    model: nn.Module,
    forward_loop: ForwardLoop | None = None,
    distributed_sync: bool = True,
    per_token_fallback_db: float | None = PER_TOKEN_FALLBACK_DB,
    fallback_rows: int = 512,
    shared_states: dict[str, dict[str, list[str]]] | None = None,
    skip_forward_without_activation_calib: bool = False,
) -> None:
    r"""The ``max`` algorithm: :func:`max_calibrate`, with the per-token fallback.

    ``skip_forward_without_activation_calib=True`` calibrates the weights only, without running
    ``forward_loop``, when no activation quantizer needs data (see :func:`needs_activation_forward`).

    ``shared_states={"weight_global_amax": {"patterns": [regex, ...]}}`` (ModelOpt's option) gives
    the static NVFP4 weights of the layers each pattern groups one global amax, the group's largest
    block amax: a pattern is full-matched against layer names and its capture groups (the parent
    module) name the group, e.g. ``r"(.*)\.(?:q_proj|k_proj|v_proj)"``. An empty list, or None
    (the default here; ModelOpt's default shares q/k/v and gate/up) shares nothing by pattern:
    calibration's last step (:func:`quant_core.make_deployable`) gives the layers that read one
    input one global scale anyway.

    A static per-tensor Linear input quantizer whose layer output error per-token scaling lowers
    by at least ``per_token_fallback_db`` dB, measured on a sample of ``fallback_rows`` calibration
    tokens per layer, becomes per-token dynamic (see :mod:`quant_core.algorithms.per_token_fallback`).
    ``per_token_fallback_db=None`` turns the fallback off.
    """
    patterns = weight_global_amax_patterns(shared_states)
    if skip_forward_without_activation_calib and not needs_activation_forward(model):
        forward_loop = None
    if forward_loop is None or per_token_fallback_db is None:
        max_calibrate(model, forward_loop, distributed_sync)
    else:
        check_min_gain_db(per_token_fallback_db)
        layers = static_per_tensor_inputs(model)
        with sample_inputs(layers, fallback_rows) as sample:
            max_calibrate(model, forward_loop, distributed_sync)
        per_token_fallback(layers, sample, per_token_fallback_db, sync=distributed_sync)
    share_weight_global_amax(model, patterns)


def needs_activation_forward(model: nn.Module) -> bool:
    """Whether max calibration of ``model`` needs its calibration forward: True when an enabled
    quantizer other than a weight quantizer collects an amax from data (it is neither dynamic,
    MX nor pinned to a constant amax). Weight quantizers are calibrated from the weights."""
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        if any(part.endswith("weight_quantizer") for part in name.split(".")):
            continue
        if not (module.is_dynamic or module.is_mx_format or module.has_constant_amax):
            return True
    return False


def weight_global_amax_patterns(shared_states: Any) -> list[re.Pattern[str]]:
    """The compiled ``weight_global_amax`` patterns of ModelOpt's ``shared_states`` option."""
    if shared_states is None:
        return []
    if not isinstance(shared_states, Mapping) or set(shared_states) - {"weight_global_amax"}:
        raise ValueError(
            "max: shared_states must be {'weight_global_amax': {'patterns': [regex, ...]}}, got "
            f"{shared_states!r}"
        )
    state = shared_states.get("weight_global_amax") or {}
    if not isinstance(state, Mapping) or set(state) - {"patterns"}:
        raise ValueError(
            f"max: shared_states['weight_global_amax'] takes only 'patterns', got {state!r}"
        )
    raw = state.get("patterns") or []
    if isinstance(raw, str) or not all(isinstance(p, str) for p in raw):
        raise ValueError(f"max: weight_global_amax patterns must be a list of regexes, got {raw!r}")
    compiled = []
    for pattern in raw:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"max: weight_global_amax pattern {pattern!r}: {err}") from None
    return compiled


def share_weight_global_amax(model: nn.Module, patterns: list[re.Pattern[str]]) -> None:
    """Give each group of static NVFP4 weights that ``patterns`` select one global amax, the
    largest block amax in the group (a layer joins the group of the first pattern it matches)."""
    groups: dict[tuple[int, tuple[str | None, ...]], list[nn.Module]] = {}
    for name, module in weight_layers(model).items():
        quantizer = module.weight_quantizer
        fmt = getattr(quantizer, "format", None)
        if fmt is None or fmt.dynamic or not fmt.has_global_amax or quantizer.amax is None:
            continue
        for i, pattern in enumerate(patterns):
            match = pattern.fullmatch(name)
            if match:
                groups.setdefault((i, match.groups()), []).append(quantizer)
                break
    for members in groups.values():
        shared = max(q.amax.max() for q in members)
        for quantizer in members:
            quantizer.global_amax = shared

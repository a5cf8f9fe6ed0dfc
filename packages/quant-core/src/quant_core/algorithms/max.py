"""The ``max`` algorithm: amax from the weights and the running max of activations, with the
per-token fallback for inputs that static per-tensor scaling serves badly."""

from __future__ import annotations

from torch import nn

from quant_core.algorithms.per_token_fallback import (
    check_min_gain_db,
    per_token_fallback,
    sample_inputs,
    static_per_tensor_inputs,
)
from quant_core.algorithms.registry import ForwardLoop, register_algorithm
from quant_core.algorithms.statistics import max_calibrate

__all__ = ["PER_TOKEN_FALLBACK_DB", "max_algorithm"]


PER_TOKEN_FALLBACK_DB = 9.0
"""Default gain (dB) of per-token over per-tensor static input scaling above which ``max`` switches."""


@register_algorithm("max")
def max_algorithm(
    model: nn.Module,
    forward_loop: ForwardLoop | None = None,
    distributed_sync: bool = True,
    per_token_fallback_db: float | None = PER_TOKEN_FALLBACK_DB,
    fallback_rows: int = 512,
) -> None:
    """The ``max`` algorithm: :func:`max_calibrate`, with the per-token fallback.

    A static per-tensor Linear input quantizer whose layer output error per-token scaling lowers
    by at least ``per_token_fallback_db`` dB, measured on a sample of ``fallback_rows`` calibration
    tokens per layer, becomes per-token dynamic (see :mod:`quant_core.algorithms.per_token_fallback`).
    ``per_token_fallback_db=None`` turns the fallback off.
    """
    if forward_loop is None or per_token_fallback_db is None:
        max_calibrate(model, forward_loop, distributed_sync)
        return
    check_min_gain_db(per_token_fallback_db)
    layers = static_per_tensor_inputs(model)
    with sample_inputs(layers, fallback_rows) as sample:
        max_calibrate(model, forward_loop, distributed_sync)
    per_token_fallback(layers, sample, per_token_fallback_db)

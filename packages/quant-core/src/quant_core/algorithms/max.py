"""The ``max`` algorithm, and the statistics-collection helpers other algorithms build on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from quant_core.algorithms.per_token_fallback import (
    check_min_gain_db,
    per_token_fallback,
    sample_inputs,
    static_per_tensor_inputs,
)
from quant_core.algorithms.registry import ForwardLoop, register_algorithm
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

PER_TOKEN_FALLBACK_DB = 9.0
"""Default gain (dB) of per-token over per-tensor static input scaling above which ``max`` switches."""


def _tensor_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def calibrate_weights(model: nn.Module) -> None:
    """Set the amax of every enabled weight quantizer directly from its module's weight."""
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor) or not quantizer.is_enabled:
            continue
        stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
        with torch.no_grad():
            w = weight
            pqs = stages[0].pre_quant_scale
            if pqs is not None:
                w = w * pqs.to(w.dtype)
            for stage in stages:
                if not stage.is_enabled:
                    continue
                stage._calibrator.reset()
                stage.collect(w)
                stage.load_calib_amax()
                w = stage._quantize(w)


@contextmanager
def collecting_statistics(
    model: nn.Module, skip_weights: bool = True, sync: bool = True
) -> Iterator[list[TensorQuantizer]]:
    """Within the block, enabled static quantizers collect statistics and pass inputs through unquantized.

    On normal exit the collected amax values are loaded; on an exception nothing is loaded and every
    quantizer is back in normal quantizing mode.
    """
    weight_ids = {id(q) for q in _weight_quantizers(model)} if skip_weights else set()
    active = [q for q in _tensor_quantizers(model) if q.is_enabled and id(q) not in weight_ids]
    for q in active:
        q._calibrator.reset()
        if q._global_calibrator is not None:
            q._global_calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    try:
        yield active
    except BaseException:
        for q in active:
            q._calibrator.reset()
        raise
    else:
        for q in active:
            q.load_calib_amax()
            if sync:
                _sync_amax(q)
    finally:
        for q in active:
            q.disable_calib()
            q.enable_quant()


def _weight_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    out = []
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, SequentialQuantizer):
            out += list(wq)
        elif isinstance(wq, TensorQuantizer):
            out.append(wq)
    return out


def _sync_amax(quantizer: TensorQuantizer) -> None:
    """Data-parallel calibration: take the max of amax over all ranks."""
    amax = quantizer.amax
    if amax is not None and dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            dist.all_reduce(amax.data, op=dist.ReduceOp.MAX)


def max_calibrate(
    model: nn.Module, forward_loop: ForwardLoop | None = None, distributed_sync: bool = True
) -> None:
    """Weights: amax from the weights. Activations: running max over the batches of ``forward_loop``."""
    calibrate_weights(model)
    if forward_loop is None:
        return
    with collecting_statistics(model, sync=distributed_sync):
        forward_loop(model)


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

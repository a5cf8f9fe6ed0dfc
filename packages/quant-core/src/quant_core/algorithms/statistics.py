"""Calibration passes and the statistics they gather, shared by every algorithm.

* ``max`` calibration: :func:`calibrate_weights` (weight amax from the weights themselves) and
  :func:`collecting_statistics` / :func:`max_calibrate` (running activation amax over a forward loop,
  synced across data-parallel ranks);
* per-layer input statistics gathered by forward pre-hooks in that same pass
  (:func:`collect_input_stats`, :func:`calibrate_with_stats`): per-channel max and mean |x|, the
  Gram matrix ``X^T X`` (whole or block-diagonal) and sampled input rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.algorithms._blocks import to_blocks
from quant_core.algorithms.registry import ForwardLoop
from quant_core.algorithms.weights import calibrate_weight
from quant_core.calib.degenerate import load_activation_amax
from quant_core.distributed import (
    all_gather_rows,
    all_reduce,
    is_distributed,
    reduce_calibrators,
)
from quant_core.input_groups import InputRecorder
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "InputStats",
    "block_diagonal_gram",
    "calibrate_weights",
    "calibrate_with_stats",
    "collect_input_stats",
    "collecting_statistics",
    "effective_input_stats",
    "max_calibrate",
    "reduce_quantizer_statistics",
    "upper_gram",
    "weight_quantizers",
    "weights_quantized_once",
]


def _tensor_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def calibrate_weights(model: nn.Module) -> None:
    """Set the amax of every enabled weight quantizer directly from its module's weight."""
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is not None and isinstance(weight, torch.Tensor) and quantizer.is_enabled:
            calibrate_weight(module)


@contextmanager
def collecting_statistics(
    model: nn.Module, skip_weights: bool = True, sync: bool = True
) -> Iterator[list[TensorQuantizer]]:
    """Within the block, enabled static quantizers collect statistics and pass inputs through unquantized.

    On normal exit the collected amax values are loaded; on an exception nothing is loaded and every
    quantizer is back in normal quantizing mode.
    """
    weight_ids = {id(q) for q in weight_quantizers(model)} if skip_weights else set()
    active = [q for q in _tensor_quantizers(model) if q.is_enabled and id(q) not in weight_ids]
    for q in active:
        q.reset_statistics()
        q.disable_quant()
        q.enable_calib()
    try:
        yield active
    except BaseException:
        for q in active:
            q.reset_statistics()
        raise
    else:
        if sync:
            reduce_quantizer_statistics(active)
        for q in active:
            load_activation_amax(q)
    finally:
        for q in active:
            q.disable_calib()
            q.enable_quant()


def weight_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Every weight quantizer of ``model`` (each stage of a multi-stage one)."""
    out = []
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, SequentialQuantizer):
            out += list(wq)
        elif isinstance(wq, TensorQuantizer):
            out.append(wq)
    return out


def reduce_quantizer_statistics(quantizers: list[TensorQuantizer]) -> None:
    """Data-parallel calibration: reduce what the calibrators of ``quantizers`` collected over the
    ranks (see :func:`quant_core.distributed.reduce_calibrators`), before their amax is loaded."""
    calibrators = []
    for q in quantizers:
        calibrators.append(q.calibrator)
        if q._global_calibrator is not None:  # NVFP4's global amax
            calibrators.append(q._global_calibrator)
    reduce_calibrators(calibrators)


def max_calibrate(
    model: nn.Module, forward_loop: ForwardLoop | None = None, distributed_sync: bool = True
) -> None:
    """Weights: amax from the weights. Activations: running max over the batches of ``forward_loop``."""
    calibrate_weights(model)
    if forward_loop is None:
        return
    with collecting_statistics(model, sync=distributed_sync):
        forward_loop(model)


@dataclass
class InputStats:
    """Statistics of the inputs one module saw during calibration (per input channel)."""

    amax: Tensor | None = None
    abs_sum: Tensor | None = None
    count: int = 0
    gram: Tensor | None = None
    samples: list[Tensor] = field(default_factory=list)
    source: str | None = None
    """Name of the module that received the very same input tensor on every batch, if any."""

    @property
    def abs_mean(self) -> Tensor:
        """Mean |x| per input channel."""
        return self.abs_sum / max(self.count, 1)

    def sample_matrix(self, limit: int, seed: int = 0) -> Tensor:
        """Up to ``limit`` stored input rows, chosen uniformly at random (fixed seed)."""
        rows = torch.cat(self.samples)
        if rows.shape[0] <= limit:
            return rows
        gen = torch.Generator().manual_seed(seed)
        return rows[torch.randperm(rows.shape[0], generator=gen)[:limit]]


def collect_input_stats(
    modules: Mapping[str, nn.Module],
    forward_loop: Callable[[], None],
    *,
    gram: bool | int = False,
    samples: int = 0,
) -> dict[str, InputStats]:
    """Run ``forward_loop`` once with pre-hooks on ``modules`` and return their input statistics.

    Always collects per-channel max |x| and mean |x|; ``gram=True`` adds ``X^T X`` (float32,
    summed over tokens), ``gram=k`` only its diagonal k x k blocks (zeros elsewhere: what
    block-wise searches read, at a fraction of the cost); ``samples`` keeps up to that many input
    rows per batch. Modules fed the very
    same tensor (q/k/v projections) share one computation of the per-batch statistics.
    """
    stats = {name: InputStats() for name in modules}
    shared = InputRecorder()  # which layers read the very tensor the previous one read
    last: dict[str, Any] = {}

    def make_hook(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if shared.note(name, x):
                inc = last["inc"]
            else:
                flat = x.detach().flatten(0, -2).float()
                mag = flat.abs()
                inc = {"amax": mag.amax(0), "abs_sum": mag.sum(0), "n": flat.shape[0]}
                del mag
                if gram is True:
                    inc["gram"] = upper_gram(flat)
                elif gram:
                    inc["gram"] = block_diagonal_gram(flat, gram)
                if samples:
                    keep = torch.randperm(flat.shape[0])[:samples]
                    inc["rows"] = flat[keep].clone()
                last["inc"] = inc
            st = stats[name]
            if st.amax is None:
                st.amax, st.abs_sum = inc["amax"].clone(), inc["abs_sum"].clone()
                st.gram = inc["gram"].clone() if gram else None
            else:
                torch.maximum(st.amax, inc["amax"], out=st.amax)
                st.abs_sum += inc["abs_sum"]
                if gram:
                    st.gram += inc["gram"]
            st.count += inc["n"]
            if samples:
                st.samples.append(inc["rows"])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        forward_loop()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
        shared.release()
    _reduce_input_stats(stats, rows=bool(samples))
    unseen = [name for name, st in stats.items() if st.count == 0]
    if unseen:
        # e.g. MoE experts that calibration routed no token to: no statistics to search with.
        warnings.warn(
            f"forward_loop never ran {len(unseen)} module(s), which keep max calibration "
            f"(weights calibrated from themselves): {unseen}",
            stacklevel=2,
        )
        for name in unseen:
            del stats[name]
    for name, source in shared.sources().items():
        if name in stats:
            stats[name].source = source
    if gram is True:
        for st in stats.values():
            st.gram = st.gram.triu() + st.gram.triu(1).T
    return stats


def _reduce_input_stats(stats: dict[str, InputStats], rows: bool) -> None:
    """Data-parallel calibration: every rank gets the statistics of all ranks' inputs (amax: max;
    sums, Gram matrices and token counts: sum; sampled rows: all of them, in rank order)."""
    if not is_distributed():
        return
    values = list(stats.values())
    for st, amax in zip(values, all_reduce([st.amax for st in values], "max")):
        st.amax = amax
    counts = [torch.tensor(st.count, dtype=torch.int64) for st in values]
    sums = all_reduce([st.abs_sum for st in values] + [st.gram for st in values] + counts, "sum")
    n = len(values)
    for i, st in enumerate(values):
        st.abs_sum, st.gram, st.count = sums[i], sums[n + i], int(sums[2 * n + i])
        if rows and st.amax is not None:
            mine = torch.cat(st.samples) if st.samples else None
            gathered = all_gather_rows(mine, st.amax.shape[-1], torch.float32)
            st.samples = [] if gathered is None else [gathered]


def block_diagonal_gram(x: Tensor, size: int) -> Tensor:
    """``x^T x`` (x: tokens x n) on its diagonal ``size`` x ``size`` blocks, zeros elsewhere (the
    last block is short when ``size`` does not divide n)."""
    parts = to_blocks(x, size).transpose(0, 1)  # (blocks, tokens, size), zero-padded
    n = x.shape[-1]
    return torch.block_diag(*(parts.mT @ parts))[:n, :n]


def upper_gram(x: Tensor, chunk: int = 256) -> Tensor:
    """The upper block triangle of ``x^T x`` (x: tokens x n), in column chunks of ``chunk``.

    ``x^T x`` is symmetric, so only the blocks on and above the diagonal are computed (about
    half the work for wide inputs); entries below the diagonal blocks are zero. The full matrix
    is ``g.triu() + g.triu(1).T``.
    """
    n = x.shape[-1]
    if n <= chunk:
        return x.T @ x
    out = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    xt = x.T
    for i in range(0, n, chunk):
        out[i : i + chunk, i:].addmm_(xt[i : i + chunk], x[:, i:])
    return out


_WEIGHT_CACHE_BYTES = 1 << 30
"""Most bytes of fake-quantized weights kept during one calibration pass (see below)."""


@contextmanager
def weights_quantized_once(model: nn.Module, budget: int = _WEIGHT_CACHE_BYTES) -> Iterator[None]:
    """Within the block, each enabled weight quantizer fake-quantizes a given weight once.

    The weights do not change during a calibration pass, so every batch would recompute the same
    fake-quantized weight; instead each quantizer reuses its last output while it is handed the
    same tensor (same storage, layout and version). At most ``budget`` bytes are cached; layers
    beyond it quantize as usual. Outside the block the quantizers are untouched.
    """
    patched: list[nn.Module] = []
    used = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if not isinstance(quantizer, nn.Module) or not isinstance(weight, Tensor):
            continue
        if not quantizer.is_enabled or "forward" in vars(quantizer):
            continue
        used += weight.numel() * weight.element_size()
        if used > budget:
            break
        quantizer.forward = _memoized(quantizer.forward)
        patched.append(quantizer)
    try:
        yield
    finally:
        for quantizer in patched:
            del quantizer.forward


def _memoized(forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``forward`` returning its last output again for the same, unmodified input tensor."""
    last: list = [None, None]

    def cached(x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return forward(x)
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)
        if last[0] != key:
            last[0], last[1] = key, forward(x)
        return last[1]

    return cached


def calibrate_with_stats(
    model: nn.Module,
    forward_loop: Callable | None,
    modules: Mapping[str, nn.Module],
    **stat_options: Any,
) -> dict[str, InputStats]:
    """``max`` calibration of the whole model, in whose forward pass ``modules`` also record their
    input statistics (see :func:`collect_input_stats`).

    ``forward_loop(model)`` runs the calibration data; None is allowed only when no statistics
    are needed (weights are then calibrated from themselves). During the pass each weight is
    fake-quantized once, not once per batch (:func:`weights_quantized_once`). Modules the loop
    never ran (MoE experts without tokens) are named in a warning, keep max calibration and are
    removed from ``modules`` when it is a dict, so that the algorithm skips them.
    """
    if forward_loop is None:
        if modules:
            raise ValueError("this algorithm needs a forward_loop to see calibration data")
        max_calibrate(model, None)
        return {}

    def loop(m: nn.Module) -> None:
        with weights_quantized_once(m):
            forward_loop(m)

    stats = collect_input_stats(modules, lambda: max_calibrate(model, loop), **stat_options)
    if isinstance(modules, dict):
        for name in [n for n in modules if n not in stats]:
            del modules[name]
    return stats


def effective_input_stats(module: nn.Module, stats: InputStats) -> InputStats:
    """Statistics of what the layer's weight multiplies: the input times any existing pre-quant scale."""
    pqs = module.input_quantizer.pre_quant_scale
    if pqs is None:
        return stats
    p = pqs.float().to(stats.amax.device)
    return InputStats(
        amax=stats.amax * p,
        abs_sum=stats.abs_sum * p,
        count=stats.count,
        gram=None if stats.gram is None else stats.gram * p.unsqueeze(0) * p.unsqueeze(1),
        samples=[s * p for s in stats.samples],
    )

"""SmoothQuant: migrate activation outliers into the weights with per-input-channel scales.

For a linear layer ``y = x W^T`` the scale ``s_j = max|X_j|^α / max|W_:,j|^(1-α)`` gives the same
float output as ``(x / s) (W s)^T`` while the scaled activations have a flatter range. ``α`` is
given, or searched per layer to minimize that layer's output error with both operands quantized.
This module also holds the forward-hook statistics collector the other algorithms share.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import quant_kernels as qk
from quant_core.algorithms._blocks import to_blocks
from quant_core.algorithms.max import max_calibrate
from quant_core.algorithms.mse import (
    BlockFormat,
    QuantFn,
    first_stage,
    kernel_format,
    recalibrate_weight,
    weight_layers,
)
from quant_core.algorithms.registry import register_algorithm
from quant_core.algorithms.shared_inputs import SharedInputs

__all__ = [
    "InputStats",
    "apply_input_scale",
    "block_diagonal_gram",
    "calibrate_with_stats",
    "collect_input_stats",
    "search_smoothing",
    "smoothing_scales",
    "smoothquant",
    "upper_gram",
]


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
    shared = SharedInputs(modules)
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


def smoothing_scales(
    act_amax: Tensor, weight_amax: Tensor, alpha: float | Tensor, floor: float = 1e-5
) -> Tensor:
    """SmoothQuant scales ``max|X_j|^α / max|W_:,j|^(1-α)``; channels with no signal get 1.

    ``alpha`` may be a tensor of several values (shape (A,)), giving scales of shape (A, in).
    """
    alpha = torch.as_tensor(alpha, dtype=act_amax.dtype, device=act_amax.device)
    a = act_amax.clamp(min=floor)
    w = weight_amax.clamp(min=floor)
    if alpha.dim():
        alpha = alpha.unsqueeze(-1)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (act_amax <= floor) | (weight_amax <= floor)
    return torch.where(dead, torch.ones_like(s), s)


def search_smoothing(
    weight: Tensor,
    x: Tensor,
    act_amax: Tensor,
    wfmt: BlockFormat,
    xquant: QuantFn | None,
    alphas: Tensor | None = None,
    chunk: int = 4,
) -> tuple[float, Tensor]:
    """Pick α (and the scales) minimizing ``||X W^T - Q(X/s) Q(W s)^T||^2`` on the rows ``x``.

    ``wfmt`` quantizes the scaled weight; ``xquant(x, amax)`` quantizes the scaled activations
    with the static per-tensor amax they would calibrate to (``max_j act_amax_j / s_j``); None
    leaves activations in float. Returns ``(alpha, scales)``.
    """
    if alphas is None:
        alphas = torch.linspace(0.0, 1.0, 11)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    x = x.to(w)
    ref = x @ w.T
    w_amax = w.abs().amax(0)
    best = (math.inf, 0.0, None)
    for start in range(0, len(alphas), chunk):
        a = alphas[start : start + chunk].to(w)
        s = smoothing_scales(act_amax.to(w), w_amax, a)  # (A, in)
        wq = wfmt(w.unsqueeze(0) * s.unsqueeze(1))
        xs = x.unsqueeze(0) / s.unsqueeze(1)
        if xquant is not None:
            x_amax = (act_amax.to(w) / s).amax(-1).view(-1, 1, 1)
            xs = xquant(xs, x_amax)
        err = (torch.bmm(xs, wq.transpose(1, 2)) - ref).square().sum((1, 2))
        i = int(err.argmin())
        if float(err[i]) < best[0]:
            best = (float(err[i]), float(a[i]), s[i])
    return best[1], best[2]


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


def input_format(module: nn.Module) -> QuantFn | None:
    """``xquant(x, amax)`` for a layer's input quantizer: static per-tensor uses the given amax,
    dynamic ones compute their own; None when the input is not quantized."""
    q = first_stage(module.input_quantizer)
    if not q.is_enabled:
        return None
    fmt = q.format
    kwargs = {"num_bits": fmt.num_bits, "unsigned": fmt.unsigned, "narrow_range": fmt.narrow_range}
    if fmt.dynamic or fmt.blocks or fmt.axis is not None:
        blocks, scale_bits = fmt.block_axes, fmt.scale_bits

        def dynamic(x: Tensor, _amax: Tensor) -> Tensor:
            return qk.fake_quantize(
                x, block_sizes=blocks or {-1: None}, scale_bits=scale_bits, **kwargs
            )

        return dynamic
    return lambda x, amax: qk.fake_quantize(x, amax=amax, **kwargs)


def apply_input_scale(
    module: nn.Module, scales: Tensor, stats: InputStats, recalibrate: bool = True
) -> None:
    """Divide the layer's input by ``scales`` (a pre-quant scale) and multiply its weight by them.

    The float output is unchanged. A static per-tensor input quantizer gets the amax the scaled
    input has on the calibration data; the weight quantizer is max-calibrated on the new weight
    unless ``recalibrate`` is False (the caller sets the weight amax itself).
    """
    with torch.no_grad():
        scales = scales.to(module.weight.device, torch.float32)
        module.weight.mul_(scales.to(module.weight.dtype))
        iq = module.input_quantizer
        old = iq.pre_quant_scale
        iq.pre_quant_scale = (old.float() if old is not None else 1.0) / scales
        stage = first_stage(iq)
        if (
            stage.is_enabled
            and not stage.is_dynamic
            and not stage.block_sizes
            and stage.axis is None
        ):
            stage.amax = (stats.amax.to(scales) * iq.pre_quant_scale).amax()
    if recalibrate:
        recalibrate_weight(module)


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


@register_algorithm("smoothquant")
def smoothquant(
    model: nn.Module,
    forward_loop: Callable | None = None,
    alpha: float | None = None,
    alphas: int = 11,
    max_samples: int = 1024,
) -> None:
    """The ``smoothquant`` algorithm on every Linear with quantized input and weight.

    ``alpha`` fixes the migration strength; None (default) searches ``alphas`` values in [0, 1]
    per layer for the least output error on up to ``max_samples`` calibration tokens.
    """
    layers = {
        n: m for n, m in weight_layers(model).items() if first_stage(m.input_quantizer).is_enabled
    }
    all_stats = calibrate_with_stats(
        model, forward_loop, layers, samples=max_samples if alpha is None else 0
    )
    grid = torch.linspace(0.0, 1.0, alphas)
    for name, module in tqdm(layers.items(), desc="smoothquant", leave=False):
        stats = effective_input_stats(module, all_stats[name])
        wfmt = kernel_format(module.weight_quantizer)
        if alpha is None and wfmt is not None:
            _, s = search_smoothing(
                module.weight.detach(),
                stats.sample_matrix(max_samples),
                stats.amax,
                wfmt,
                input_format(module),
                grid,
            )
        else:
            w_amax = module.weight.detach().float().abs().amax(0)
            s = smoothing_scales(stats.amax, w_amax, 0.5 if alpha is None else alpha)
        apply_input_scale(module, s, all_stats[name])

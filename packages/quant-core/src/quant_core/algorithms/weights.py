"""Weight formats as the algorithms see them, and writing their results back into a model.

Every weight algorithm (MSE, AWQ, GPTQ, SVDQuant) works on a 2-D weight ``(rows, cols)`` cut
into blocks of ``block`` columns (one amax per row and block; a whole row when ``block`` is
None). A block size that does not divide ``cols`` is handled as the kernels do: the columns
are zero-padded to a multiple of the block (the last block is short) and there are
``ceil(cols / block)`` amaxes per row. A :class:`BlockFormat` pairs that layout with an element-wise
fake-quantizer ``quant(x, amax)`` (the format's numerics, e.g. ``quant_kernels.fake_quantize``), so
the algorithms run unchanged for INT4/INT8 block-wise, FP8, NVFP4 or MX weights.
:func:`kernel_format` builds it from a quantizer's `quant_kernels.QuantFormat`. The write-back side:
:func:`calibrate_weight` (the one max calibration of a weight's quantizer stages),
:func:`set_weight_amax` and :func:`apply_input_scale` (a pre-quant scale moved into the weight).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import quant_kernels as qk
from quant_core.algorithms._blocks import from_blocks, to_blocks
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "BlockFormat",
    "QuantFn",
    "apply_input_scale",
    "calibrate_weight",
    "first_stage",
    "input_format",
    "kernel_format",
    "set_weight_amax",
    "weight_layers",
]


QuantFn = Callable[[Tensor, Tensor], Tensor]
"""``quant(x, amax) -> x_q``: fake-quantizes ``x`` element-wise with a broadcastable amax."""


@dataclass(frozen=True)
class BlockFormat:
    """A weight format for the algorithms: element quantizer plus block layout along columns."""

    quant: QuantFn
    block: int | None = None
    per_tensor: bool = False
    grid: qk.QuantFormat | None = None
    """Set when ``quant`` is a plain grid (INT or FP elements with float32 scales ``amax / M``):
    callers may then use ``quant_kernels``' batched grid primitives (`qk.fake_quantize_grid`)."""

    def block_size(self, cols: int) -> int:
        """Columns per block for a weight with ``cols`` columns (the last block may be shorter)."""
        return cols if self.block is None else self.block

    def blocks(self, w: Tensor) -> Tensor:
        """View ``w`` (..., rows, cols) as (..., rows, ceil(cols / block), block), zero-padded."""
        return to_blocks(w, self.block_size(w.shape[-1]))

    def amax(self, w: Tensor) -> Tensor:
        """Per-block max |w| of shape (..., rows, n_blocks, 1) (one value repeated if per tensor)."""
        amax = self.blocks(w).abs().amax(-1, keepdim=True)
        if self.per_tensor:
            amax = amax.amax((-3, -2), keepdim=True).expand_as(amax)
        return amax

    def __call__(self, w: Tensor, amax: Tensor | None = None) -> Tensor:
        """Fake-quantize ``w`` (..., rows, cols) with per-block ``amax`` (max |w| per block if None)."""
        if amax is None:
            amax = self.amax(w)
        return from_blocks(self.quant(self.blocks(w), amax), w.shape[-1])


# ----- model side: formats of real quantizers, weight layers, writing results back ---------------
def first_stage(quantizer: nn.Module) -> TensorQuantizer:
    """The TensorQuantizer whose format the algorithms optimize (the first of a sequential chain)."""
    return quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer


def kernel_format(quantizer: nn.Module, global_amax: Tensor | None = None) -> BlockFormat | None:
    """The :class:`BlockFormat` of a Linear weight quantizer, or None when its layout is unsupported.

    Supported: blocks along the input dim, per output channel (axis 0) and per tensor. Numerics
    are ``quant_kernels.fake_quantize``; NVFP4's global amax is ``global_amax`` when given, else
    the largest amax of each call (as a static quantizer does).
    """
    q = first_stage(quantizer)
    if not q.is_enabled:
        return None
    qfmt = q.format
    axes = qfmt.block_axes
    if axes:
        if len(axes) != 1 or next(iter(axes)) not in (-1, 1):
            return None
        block, per_tensor = next(iter(axes.values())), False
    elif qfmt.axis in (0, -2):
        block, per_tensor = None, False
    elif qfmt.axis is None:
        block, per_tensor = None, True
    else:
        return None
    if global_amax is None or not qfmt.has_global_amax:
        global_amax = None
    grid = qfmt if qfmt.scale_mode is qk.ScaleMode.FLOAT32 else None

    @functools.cache  # one format per block length, not one per call
    def along_last(size: int) -> qk.QuantFormat:
        # the searches score plain blocks: four over six's per-block choice is not searched
        return dataclasses.replace(qfmt, blocks=((-1, size),), four_over_six=False)

    def quant(x: Tensor, amax: Tensor) -> Tensor:
        if grid is not None:
            return qk.fake_quantize_grid(x, amax, grid).to(x.dtype)
        lead = torch.broadcast_shapes(x.shape[:-1], amax.shape[:-1])
        x = x.expand(*lead, x.shape[-1])
        if amax.shape[-1] == 1 and x.shape[-1] > 1:
            amax = amax.expand(*lead, 1)
            return qk.fake_quantize_format(x, along_last(x.shape[-1]), amax, global_amax)
        amax = amax.expand_as(x)  # one amax per element: blocks of one along the last axis
        y = qk.fake_quantize_format(x.unsqueeze(-1), along_last(1), amax.unsqueeze(-1), global_amax)
        return y.squeeze(-1)

    return BlockFormat(quant, block, per_tensor, grid)


def weight_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Quantized Linear layers whose weight quantizer is enabled, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and hasattr(m, "weight_quantizer")
        and m.weight_quantizer.is_enabled
    }


def calibrate_weight(module: nn.Module, first: int = 0) -> None:
    """Max-calibrate the stages of ``module.weight_quantizer`` from stage ``first`` on: each on what
    the stages before it output, starting from the weight times the first stage's pre-quant scale
    (disabled stages are skipped). The one weight calibration every algorithm uses."""
    quantizer = module.weight_quantizer
    stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
    with torch.no_grad():
        w = module.weight
        pqs = stages[0].pre_quant_scale
        if pqs is not None:
            w = w * pqs.to(w.dtype)
        for i, stage in enumerate(stages):
            if not stage.is_enabled:
                continue
            if i >= first:
                stage.calibrate_from(w)
            if i + 1 < len(stages):
                w = stage.fake_quantize(w)


def set_weight_amax(module: nn.Module, amax: Tensor, fmt: BlockFormat) -> None:
    """Store searched per-block ``amax`` (rows, n_blocks, 1) in the first weight-quantizer stage.

    A dynamic block quantizer (NVFP4, MX) becomes static so that the searched amax is used; the
    other stages of a sequential quantizer are max-calibrated on the first stage's output.
    """
    q = first_stage(module.weight_quantizer)
    if q.is_dynamic and q.block_sizes:
        q.block_sizes = {**q.block_sizes, "type": "static"}
    # A per-tensor amax arrives repeated for every block (BlockFormat.amax); store it once.
    q.amax = amax.amax() if fmt.per_tensor else amax.squeeze(-1)
    calibrate_weight(module, first=1)


def input_format(module: nn.Module) -> QuantFn | None:
    """``xquant(x, amax)`` for a layer's input quantizer: static per-tensor uses the given amax,
    dynamic ones compute their own; None when the input is not quantized."""
    q = first_stage(module.input_quantizer)
    if not q.is_enabled:
        return None
    fmt = q.format
    if fmt.dynamic or fmt.blocks or fmt.axis is not None:
        # dynamic: the kernels take the amax per token (a whole-last-axis block) or per block
        dynamic = fmt if fmt.blocks else dataclasses.replace(fmt, blocks=((-1, None),))
        return lambda x, _amax: qk.fake_quantize_format(x, dynamic)
    return lambda x, amax: qk.fake_quantize_format(x, fmt, amax)


def apply_input_scale(
    module: nn.Module, scales: Tensor, act_amax: Tensor | None, recalibrate: bool = True
) -> None:
    """Divide the layer's input by ``scales`` (a pre-quant scale) and multiply its weight by them.

    The float output is unchanged. A static per-tensor input quantizer gets the amax the scaled
    input has on the calibration data (``act_amax``: max |x| per input channel; None keeps its
    amax); the weight quantizer is max-calibrated on the new weight unless ``recalibrate`` is False
    (the caller sets the weight amax itself).
    """
    with torch.no_grad():
        scales = scales.to(module.weight.device, torch.float32)
        module.weight.mul_(scales.to(module.weight.dtype))
        iq = module.input_quantizer
        old = iq.pre_quant_scale
        iq.pre_quant_scale = (old.float() if old is not None else 1.0) / scales
        stage = first_stage(iq)
        if (
            act_amax is not None
            and stage.is_enabled
            and not stage.is_dynamic
            and not stage.block_sizes
            and stage.axis is None
        ):
            stage.amax = (act_amax.to(scales) * iq.pre_quant_scale).amax()
    if recalibrate:
        calibrate_weight(module)

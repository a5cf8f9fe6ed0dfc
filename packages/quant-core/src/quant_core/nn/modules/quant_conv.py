"""ModelOpt path ``nn.modules.quant_conv``: quantized Conv and ConvTranspose 1-3d (and ModelOpt's aliases).

Also ModelOpt's NVFP4 Conv3d helpers: `_is_nvfp4_quantizer` (is a quantizer dynamic NVFP4?) and
`_nvfp4_quantize_weight_along_k` (NVFP4 blocks taken along the GEMM reduction axis of a conv
weight, ``in_channels * prod(kernel)``). quant-core has no implicit-GEMM Conv3d kernel, so
``QuantConv3d`` always runs the ordinary conv path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import quant_kernels as qk
from quant_core.nn.builtin_modules import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)


def _is_nvfp4_quantizer(quantizer: object) -> bool:
    """True when ``quantizer`` is a dynamic NVFP4 quantizer (E2M1 codes, E4M3 block scales).

    Reads the quantizer's parsed format, not its enable state: a disabled NVFP4 quantizer is still
    NVFP4. Static-block NVFP4 and every other format give False.
    """
    fmt = getattr(quantizer, "format", None)
    if not isinstance(fmt, qk.QuantFormat):
        return False
    return (
        fmt.dynamic
        and fmt.element.name == "e2m1"
        and fmt.scale_mode is qk.ScaleMode.E4M3
        and bool(fmt.blocks)
    )


def _nvfp4_quantize_weight_along_k(
    weight: torch.Tensor, weight_quantizer: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``weight_quantizer`` applied to a conv weight flattened to ``(out_channels, K)``, reshaped back.

    ``K = in_channels * prod(kernel_size)`` is the reduction axis of the convolution seen as a
    GEMM, so last-axis blocks (NVFP4's 16) group the values one output sums together.
    """
    return weight_quantizer(weight.reshape(weight.shape[0], -1)).reshape_as(weight)


Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
]

"""ModelOpt's ``tensor_quant`` functions and quantizer descriptors, over ``quant_kernels.fake_quantize``.

Gradients are straight-through inside the range and zero where the value saturated, or unchanged
everywhere with ``pass_through_bwd=True`` (these functions default to False, as ModelOpt's do).
"""

from __future__ import annotations

import torch

import quant_kernels as qk
from quant_core.config.schema import QuantizerAttributeConfig
from quant_core.nn.lsq import cast_ste

E4M3_MAX = qk.E4M3_MAX  # ModelOpt's name, from the format table

QUANT_DESC_8BIT_PER_TENSOR = QuantizerAttributeConfig(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantizerAttributeConfig(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantizerAttributeConfig(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW
QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW


def int_cast_ste(
    x: torch.Tensor, num_bits: int, unsigned: bool = False, narrow_range: bool = True
) -> torch.Tensor:
    """``x`` rounded to the integers of a ``num_bits`` INT grid and clamped to its range
    (``[-(2^(b-1)-1), 2^(b-1)-1]`` narrow, ``[-2^(b-1), ...]`` full, ``[0, 2^b-1]`` unsigned),
    with a straight-through gradient inside the range and zero outside (the LSQ element cast)."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise ValueError(f"int_cast_ste takes an integer num_bits, got {num_bits!r}")
    fmt = qk.QuantFormat.parse(num_bits, unsigned=unsigned, narrow_range=narrow_range)
    return cast_ste(x, fmt)


def _with_bias(x: torch.Tensor, bias: torch.Tensor | None, fn) -> torch.Tensor:
    return fn(x) if bias is None else fn(x - bias) + bias


def fake_tensor_quant(
    inputs: torch.Tensor,
    amax: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = True,
    trt_high_precision_dtype: str | None = None,
    pass_through_bwd: bool = False,
    block_size: int | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer fake quantization with scale ``amax / qmax`` (``amax`` broadcastable to ``inputs``).

    ``narrow_range`` (ModelOpt's default here: True) uses [-qmax, qmax] instead of [-qmax-1, qmax].
    """
    if block_size is not None:
        raise ValueError(
            "fake_tensor_quant with block_size: use a TensorQuantizer with block_sizes instead"
        )
    return _with_bias(
        inputs,
        bias,
        lambda x: qk.fake_quantize(
            x,
            num_bits=num_bits,
            amax=torch.as_tensor(amax, dtype=torch.float32),
            unsigned=unsigned,
            narrow_range=narrow_range,
            pass_through_bwd=pass_through_bwd,
        ),
    )


def scaled_e4m3(
    inputs: torch.Tensor,
    amax: torch.Tensor | float | None,
    bias: torch.Tensor | None = None,
    E: int = 4,
    M: int = 3,
    trt_high_precision_dtype: str | None = None,
    pass_through_bwd: bool = False,
) -> torch.Tensor:
    """FP8 E4M3 fake quantization with scale ``amax / 448`` (``amax=None``: no scaling)."""
    if (E, M) != (4, 3):
        raise ValueError(f"scaled_e4m3 supports E=4, M=3 only, got E={E}, M={M}")
    bound = torch.as_tensor(E4M3_MAX if amax is None else amax, dtype=torch.float32)
    return _with_bias(
        inputs,
        bias,
        lambda x: qk.fake_quantize(
            x, num_bits=(4, 3), amax=bound, pass_through_bwd=pass_through_bwd
        ),
    )


# ModelOpt's are autograd ``Function.apply``s, which a class can hold as an attribute and call as
# ``self.fake_tensor_quant(x, amax)`` without binding ``self``: a staticmethod object behaves the
# same (and is still callable as ``tensor_quant.fake_tensor_quant(x, amax)``).
fake_tensor_quant = staticmethod(fake_tensor_quant)
scaled_e4m3 = staticmethod(scaled_e4m3)

__all__ = [
    "E4M3_MAX",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "fake_tensor_quant",
    "int_cast_ste",
    "scaled_e4m3",
]

"""ModelOpt's ``quantization.utils`` helpers: is a model / module quantized, amax and sum reductions."""

from __future__ import annotations

import torch
from torch import nn

from quant_core.config.helpers import update_quant_cfg_with_kv_cache_quant
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer


def is_quantized(module: nn.Module) -> bool:
    """True when ``module`` or any submodule is a quantizer."""
    return any(isinstance(m, (TensorQuantizer, SequentialQuantizer)) for m in module.modules())


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a quantized linear-like module: input and weight quantizers and a 2-D weight."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "input_quantizer", None), (TensorQuantizer, SequentialQuantizer))
        and isinstance(
            getattr(module, "weight_quantizer", None), (TensorQuantizer, SequentialQuantizer)
        )
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def weight_attr_names(module: nn.Module) -> list[str]:
    """Names of the weights of ``module`` that have a quantizer (``weight`` -> ``weight_quantizer``)."""
    return [
        name
        for name, _p in module.named_parameters(recurse=False)
        if isinstance(getattr(module, f"{name}_quantizer", None), nn.Module)
    ]


def convert_quantization_axis_to_reduce_axis(
    input: torch.Tensor, axis: int | tuple[int, ...] | list[int] | None
) -> list[int] | None:
    """The dimensions to reduce over to keep one value per index of ``axis`` (None: all dims)."""
    if axis is None:
        return None
    kept = {a % input.dim() for a in ([axis] if isinstance(axis, int) else axis)}
    return [d for d in range(input.dim()) if d not in kept]


@torch.no_grad()
def reduce_amax(
    input: torch.Tensor,
    axis: int | tuple[int, ...] | list[int] | None = None,
    keepdims: bool = True,
    squeeze_scalar: bool = True,
) -> torch.Tensor:
    """max |input| over the dimensions in ``axis`` (None: all, giving a 0-d tensor).

    A one-element result is squeezed to 0-d when ``squeeze_scalar``; float8 inputs are reduced in
    the default float dtype (exact), also on CPU.
    """
    if input.is_floating_point() and input.element_size() == 1:
        input = input.to(torch.get_default_dtype())
    if axis is None:
        return torch.maximum(input.max().abs(), input.min().abs())
    dims = (axis,) if isinstance(axis, int) else tuple(axis)
    out = torch.maximum(
        input.amax(dim=dims, keepdim=keepdims).abs(), input.amin(dim=dims, keepdim=keepdims).abs()
    )
    return out.squeeze() if squeeze_scalar and out.numel() == 1 else out


@torch.no_grad()
def reduce_sum(
    input: torch.Tensor,
    axis: int | tuple[int, ...] | list[int] | None = None,
    keepdims: bool = True,
) -> torch.Tensor:
    """Sum of ``input`` over the dimensions in ``axis`` (None: all, giving a 0-d tensor)."""
    if axis is None:
        return input.sum()
    return input.sum(dim=(axis,) if isinstance(axis, int) else tuple(axis), keepdim=keepdims)


__all__ = [
    "convert_quantization_axis_to_reduce_axis",
    "is_quantized",
    "is_quantized_linear",
    "reduce_amax",
    "reduce_sum",
    "update_quant_cfg_with_kv_cache_quant",
    "weight_attr_names",
]

"""ModelOpt's ``quantization.utils.core_utils``: is a model / module quantized, amax and sum
reductions (also block-wise), the parameter-name index FSDP2 export resolves modules with, the
``enable_fake_quant`` switch and the promotion of static block weight quantizers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quant_core.config.helpers import update_quant_cfg_with_kv_cache_quant
from quant_core.nn.block_scale import StaticBlockScaleQuantizer
from quant_core.nn.nvfp4_static import NVFP4StaticQuantizer
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
def reduce_block_amax(input_tensor: torch.Tensor, block_sizes: Mapping[Any, Any]) -> torch.Tensor:
    """max |x| of each block of ``input_tensor``, one value per block.

    ``block_sizes`` maps a dimension to its block size (``{-1: 128, -2: 128}``: 128x128 tiles);
    non-integer keys (``"type"``, ``"scale_bits"``) are ignored. Each blocked dimension of size
    ``n`` becomes ``n // size`` in the result; the others are kept. A dimension that the block
    size does not divide raises ValueError.
    """
    out = input_tensor
    for dim, size in block_sizes.items():
        if not isinstance(dim, int) or isinstance(dim, bool):
            continue
        if size is None:
            raise ValueError(f"reduce_block_amax needs a block size for dim {dim}, got None")
        d = dim % out.dim()
        if out.shape[d] % size:
            raise ValueError(
                f"reduce_block_amax: dim {dim} of size {out.shape[d]} is not divisible by the "
                f"block size {size}"
            )
        out = out.unflatten(d, (out.shape[d] // size, size))
        out = reduce_amax(out, d + 1, keepdims=False, squeeze_scalar=False)
    return out


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


def build_param_index(model: nn.Module) -> dict[int, tuple[int, str]]:
    """``id(parameter) -> (position, name)`` over ``model.named_parameters()``, built in one walk.

    A parameter reachable under several names (tied weights) is listed once, under its first
    name, as ``named_parameters`` does.
    """
    return {id(p): (pos, name) for pos, (name, p) in enumerate(model.named_parameters())}


def get_prefixed_param_names(
    parent_model: nn.Module,
    target_module: nn.Module,
    param_index: dict[int, tuple[int, str]] | None = None,
) -> str | None:
    """The name of ``target_module`` inside ``parent_model``, found through its parameters.

    It is the module prefix of the earliest (in ``parent_model.named_parameters()`` order) of
    ``target_module``'s parameters that ``parent_model`` holds; None when it holds none of them
    (a foreign or parameterless module). Pass ``param_index`` (:func:`build_param_index`) when
    resolving many modules against one model.
    """
    if param_index is None:
        param_index = build_param_index(parent_model)
    found = [param_index[id(p)] for p in target_module.parameters() if id(p) in param_index]
    if not found:
        return None
    return min(found)[1].rpartition(".")[0]


def create_fsdp_param_mapping(fsdp_param_list: Iterable[Any], model: nn.Module) -> dict[str, Any]:
    """``full parameter name -> FSDPParam`` for FSDP2's parameters of ``model``.

    Each FSDPParam names its owning module and its unprefixed name in ``_module_info``; the
    module's prefix comes from one parameter walk of ``model`` shared by all of them.
    """
    index = build_param_index(model)
    mapping: dict[str, Any] = {}
    for fsdp_param in fsdp_param_list:
        info = fsdp_param._module_info
        prefix = get_prefixed_param_names(model, info.module, index)
        if prefix is not None:
            mapping[f"{prefix}.{info.param_name}" if prefix else info.param_name] = fsdp_param
    return mapping


@contextmanager
def enable_fake_quant(module: nn.Module) -> Iterator[None]:
    """Within the block, every ``weight_quantizer`` under ``module`` fake-quantizes
    (``fake_quant=True``); each gets its own setting back afterwards. quant-core quantizers always
    fake-quantize (``fake_quant=False`` is refused), so here this changes nothing."""
    quantizers = [
        m.weight_quantizer
        for m in module.modules()
        if isinstance(getattr(m, "weight_quantizer", None), TensorQuantizer)
    ]
    saved = [q.fake_quant for q in quantizers]
    for q in quantizers:
        q.fake_quant = True
    try:
        yield
    finally:
        for q, value in zip(quantizers, saved):
            q.fake_quant = value


def promote_static_block_weight_quantizers(model: nn.Module) -> int:
    """Give each enabled, calibrated static block weight quantizer under ``model`` (the first stage
    of a multi-stage one) its static class in place: NVFP4 ones become `NVFP4StaticQuantizer`
    (global amax: the largest block amax), or `StaticBlockScaleQuantizer` when they hold a shared
    global amax; INT ones `StaticBlockScaleQuantizer`. Returns how many NVFP4 ones changed class."""
    converted = 0
    for module in list(model.modules()):
        for name in weight_attr_names(module):
            quantizer = getattr(module, f"{name}_quantizer")
            if isinstance(quantizer, SequentialQuantizer):
                quantizer = quantizer[0] if len(quantizer) else None
            if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_enabled:
                continue
            fmt = quantizer.format
            if fmt.dynamic or not fmt.sized_blocks or quantizer.amax is None:
                continue
            if fmt.has_global_amax:
                shared = quantizer._buffers.get("_global_amax") is not None
                target = StaticBlockScaleQuantizer if shared else NVFP4StaticQuantizer
                if not isinstance(quantizer, target):
                    target.from_tensor_quantizer(quantizer)
                    converted += 1
            elif isinstance(fmt.num_bits, int):
                StaticBlockScaleQuantizer.from_tensor_quantizer(quantizer)
    return converted


promote_nvfp4_static_quantizers = promote_static_block_weight_quantizers  # ModelOpt's older name


__all__ = [
    "build_param_index",
    "convert_quantization_axis_to_reduce_axis",
    "create_fsdp_param_mapping",
    "enable_fake_quant",
    "get_prefixed_param_names",
    "is_quantized",
    "is_quantized_linear",
    "promote_nvfp4_static_quantizers",
    "promote_static_block_weight_quantizers",
    "reduce_amax",
    "reduce_block_amax",
    "reduce_sum",
    "update_quant_cfg_with_kv_cache_quant",
    "weight_attr_names",
]

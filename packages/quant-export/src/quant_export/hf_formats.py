"""Per-layer tensors of the unified Hugging Face checkpoint (the layout ModelOpt writes and vLLM / TensorRT-LLM read).

A quantized ``nn.Linear`` named ``L`` is recognised from its weight and input quantizers by the
table :data:`LINEAR_FORMATS` and stored as ``L.weight`` (codes) plus its scales:

* ``FP8``: ``weight`` float8_e4m3fn, ``weight_scale`` fp32 scalar (amax / 448), ``input_scale``.
* ``FP8_PER_CHANNEL_PER_TOKEN``: ``weight`` float8_e4m3fn, ``weight_scale`` fp32 ``(out,)``.
* ``W8A8_SQ_PER_CHANNEL`` / ``W8A16``: ``weight`` int8, ``weight_scale`` fp32 ``(out,)``
  (amax / 127), ``input_scale`` (W8A8 only).
* ``W4A16_AWQ``: ``weight`` uint8 ``(out / 2, in)`` holding INT4 codes two per byte along the
  output axis (row ``2r`` in the low nibble, row ``2r + 1`` in the high nibble, two's complement),
  ``weight_scale`` fp32 ``(out, in / group)``.
* ``NVFP4`` (and ``NVFP4_AWQ``, ``NVFP4_SVD``, ``W4A16_NVFP4``): ``weight`` uint8 ``(out, in / 2)``
  holding E2M1 codes two per byte along the input axis (column ``2c`` in the low nibble),
  ``weight_scale`` float8_e4m3fn ``(out, in / 16)``, ``weight_scale_2`` fp32 scalar
  (global amax / (6 * 448)), ``input_scale`` fp32 scalar (input global amax / (6 * 448)).

Every static ``input_scale`` is amax / format max. An input quantizer's ``pre_quant_scale``
(SmoothQuant, AWQ) is written as ``L.pre_quant_scale`` (fp32): it multiplies the activations, so it
cannot be folded into stored codes. A weight quantizer's own ``pre_quant_scale`` is folded into the
weight before it is quantized. Codes and scales come from ``quant_kernels.quantize_to_codes``, so
they are exactly what the fake-quantized model computed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import quant_kernels as qk
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.quantizers import QuantizerSpec, UnsupportedFormatError, spec_of


class Kind(enum.Enum):
    """How a Linear's weight or input is held in the Hugging Face layouts (the value names it)."""

    OFF = "off"
    FP8_TENSOR = "fp8_tensor"
    FP8_CHANNEL = "fp8_channel"
    FP8_TOKEN = "fp8_token"
    INT8_CHANNEL = "int8_channel"
    INT8_TENSOR = "int8_tensor"
    INT4_BLOCK = "int4_block"
    NVFP4 = "nvfp4"


class _Grain(enum.Enum):
    """A quantizer's granularity as the layouts distinguish it."""

    TENSOR = enum.auto()  # no blocks, no axis (inputs: static too)
    CHANNEL = enum.auto()  # no blocks, axis 0 (weights)
    TOKEN = enum.auto()  # dynamic, one group per row: block_sizes {-1: None} (inputs)
    LAST_BLOCKS = enum.auto()  # sized blocks along the last axis only (weights)
    OTHER = enum.auto()


E4M3, INT8, INT4, E2M1 = (qk.ElementFormat.parse(b) for b in ((4, 3), 8, 4, (2, 1)))
_F32, _TWO_LEVEL = qk.ScaleMode.FLOAT32, qk.ScaleMode.E4M3
# (element, scale format, granularity) -> kind, for weights and for inputs.
WEIGHT_KINDS: dict[tuple[qk.ElementFormat, qk.ScaleMode, _Grain], Kind] = {
    (E4M3, _F32, _Grain.TENSOR): Kind.FP8_TENSOR,
    (E4M3, _F32, _Grain.CHANNEL): Kind.FP8_CHANNEL,
    (INT8, _F32, _Grain.CHANNEL): Kind.INT8_CHANNEL,
    (INT4, _F32, _Grain.LAST_BLOCKS): Kind.INT4_BLOCK,
    (E2M1, _TWO_LEVEL, _Grain.LAST_BLOCKS): Kind.NVFP4,
}
INPUT_KINDS: dict[tuple[qk.ElementFormat, qk.ScaleMode, _Grain], Kind] = {
    (E4M3, _F32, _Grain.TENSOR): Kind.FP8_TENSOR,
    (INT8, _F32, _Grain.TENSOR): Kind.INT8_TENSOR,
    **{(E4M3, mode, _Grain.TOKEN): Kind.FP8_TOKEN for mode in qk.ScaleMode},
    **{(E2M1, _TWO_LEVEL, grain): Kind.NVFP4 for grain in (_Grain.TOKEN, _Grain.OTHER)},
}
# (weight kind, input kind) -> (ModelOpt quant_algo, compressed-tensors format): the layer formats
# both Hugging Face layouts hold. Anything else raises UnsupportedFormatError.
LINEAR_LAYOUTS: dict[tuple[Kind, Kind], tuple[str, str]] = {
    (Kind.FP8_TENSOR, Kind.FP8_TENSOR): ("FP8", "float-quantized"),
    (Kind.FP8_CHANNEL, Kind.FP8_TOKEN): ("FP8_PER_CHANNEL_PER_TOKEN", "float-quantized"),
    (Kind.INT8_CHANNEL, Kind.INT8_TENSOR): ("W8A8_SQ_PER_CHANNEL", "int-quantized"),
    (Kind.INT8_CHANNEL, Kind.OFF): ("W8A16", "pack-quantized"),
    (Kind.INT4_BLOCK, Kind.OFF): ("W4A16_AWQ", "pack-quantized"),
    (Kind.NVFP4, Kind.NVFP4): ("NVFP4", "nvfp4-pack-quantized"),
    (Kind.NVFP4, Kind.OFF): ("W4A16_NVFP4", "nvfp4-pack-quantized"),
}
LINEAR_FORMATS: dict[tuple[Kind, Kind], str] = {k: v[0] for k, v in LINEAR_LAYOUTS.items()}
# kv_cache_quant_algo of a per-tensor k/v_bmm_quantizer, by element format, and the bound its
# k_scale / v_scale divide amax by: the element's largest value (ModelOpt defines NVFP4 KV scales
# by the E4M3 block-scale maximum instead).
KV_FORMATS: dict[qk.ElementFormat, tuple[str, float]] = {
    E4M3: ("FP8", qk.E4M3_MAX),
    INT8: ("INT8", INT8.max_value),
    E2M1: ("NVFP4", qk.E4M3_MAX),
}
KV_QUANTIZERS = ("k_bmm_quantizer", "v_bmm_quantizer")


@dataclass
class LayerExport:
    """What one quantized layer contributes to the checkpoint."""

    quant_algo: str
    group_size: int | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    quantizers: tuple[str, ...] = ()
    kinds: tuple[Kind, Kind] = (Kind.OFF, Kind.OFF)  # (weight, input): the LINEAR_FORMATS key

    def layer_config(self) -> dict[str, Any]:
        """The layer's entry in ``quantized_layers`` (ModelOpt's per-layer form)."""
        cfg: dict[str, Any] = {"quant_algo": self.quant_algo}
        if self.group_size:
            cfg["group_size"] = self.group_size
        if self.quant_algo in ("W4A16_AWQ", "NVFP4_AWQ", "NVFP4_SVD"):
            cfg.update(has_zero_point=False, pre_quant_scale="pre_quant_scale" in self.tensors)
        return cfg


def _unsupported(name: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"layer {name}: {why}; it has no form in the Hugging Face (ModelOpt / vLLM) checkpoint"
    )


def _is_channel_axis(axis: Any) -> bool:
    return axis == 0 or axis == (0,)


def _weight_grain(spec: QuantizerSpec, ndim: int) -> _Grain:
    blocks = {a % ndim: b for a, b in spec.blocks.items()}
    if not blocks:
        if spec.axis is None:
            return _Grain.TENSOR
        return _Grain.CHANNEL if _is_channel_axis(spec.axis) else _Grain.OTHER
    if set(blocks) == {ndim - 1} and blocks[ndim - 1]:
        return _Grain.LAST_BLOCKS
    return _Grain.OTHER


def _input_grain(spec: QuantizerSpec) -> _Grain:
    if not spec.blocks and spec.axis is None and not spec.dynamic:
        return _Grain.TENSOR
    if spec.dynamic and spec.blocks == {-1: None}:
        return _Grain.TOKEN
    return _Grain.OTHER


def weight_kind(spec: QuantizerSpec, ndim: int) -> Kind | None:
    """The weight format's row in :data:`LINEAR_FORMATS` (None when the table has none)."""
    return WEIGHT_KINDS.get((spec.element, spec.format.scale_mode, _weight_grain(spec, ndim)))


def input_kind(spec: QuantizerSpec) -> Kind | None:
    """The input format's column in :data:`LINEAR_FORMATS` (None when the table has none)."""
    if not spec.enabled:
        return Kind.OFF
    return INPUT_KINDS.get((spec.element, spec.format.scale_mode, _input_grain(spec)))


def _pack_int4_rows(codes: torch.Tensor, name: str) -> torch.Tensor:
    """INT4 codes (out, in) -> uint8 (out / 2, in): rows 2r and 2r + 1 share a byte (2r low)."""
    if codes.shape[0] % 2:
        raise _unsupported(name, f"INT4 weight has an odd number of rows ({codes.shape[0]})")
    return qk.pack_int4(codes.t().contiguous()).t().contiguous()


def _activation_scale(name: str, spec: QuantizerSpec, kind: Kind) -> torch.Tensor | None:
    """``input_scale``: amax / format max (NVFP4: global amax / (6 * 448)); None when dynamic."""
    if kind in (Kind.OFF, Kind.FP8_TOKEN):
        return None
    if spec.amax is None:
        raise _unsupported(name, f"input quantizer {spec.name} was never calibrated (amax is None)")
    nvfp4 = kind is Kind.NVFP4
    amax = spec.global_amax(None) if nvfp4 else spec.amax.float().reshape(())
    bound = spec.element.max_value * (qk.E4M3_MAX if nvfp4 else 1.0)
    return (amax / bound).reshape(())


def linear_specs(
    name: str, module: nn.Module, unsupported: Callable[[str, str], Exception] = _unsupported
) -> tuple[QuantizerSpec | None, QuantizerSpec | None]:
    """(weight spec, input spec) of a quantized Linear; ``unsupported`` builds the error for W4A8."""
    wq, iq = module.weight_quantizer, getattr(module, "input_quantizer", None)
    for q in (wq, iq):
        if isinstance(q, SequentialQuantizer) and q.is_enabled:
            raise unsupported(name, "multi-stage quantizer (SequentialQuantizer, e.g. W4A8)")
    w = spec_of(f"{name}.weight_quantizer", wq) if isinstance(wq, TensorQuantizer) else None
    i = spec_of(f"{name}.input_quantizer", iq) if isinstance(iq, TensorQuantizer) else None
    return w, i


def export_linear(name: str, module: nn.Module) -> LayerExport | None:
    """Codes and scales of the quantized Linear ``name``; None when it is left unquantized."""
    w_spec, i_spec = linear_specs(name, module)
    if w_spec is None or not w_spec.enabled:
        if i_spec is not None and i_spec.enabled:
            raise _unsupported(name, f"input quantized ({i_spec.describe()}) with a float weight")
        return None
    weight = module.weight.detach().float()
    w_kind = weight_kind(w_spec, weight.dim())
    i_kind = Kind.OFF if i_spec is None else input_kind(i_spec)
    algo = LINEAR_FORMATS.get((w_kind, i_kind)) if w_kind and i_kind else None
    if algo is None:
        inputs = "none" if i_spec is None or not i_spec.enabled else i_spec.describe()
        raise _unsupported(
            name, f"weight {w_spec.describe()} with input {inputs} is not a supported combination"
        )
    if w_spec.pre_quant_scale is not None:
        weight = weight * w_spec.pre_quant_scale
    blocks = {a % weight.dim(): b for a, b in w_spec.blocks.items()}
    group_size = blocks.get(weight.dim() - 1)
    if group_size and weight.shape[-1] % group_size:
        raise _unsupported(
            name,
            f"input size {weight.shape[-1]} is not divisible by its block size {group_size} "
            "(engines read whole blocks)",
        )
    qt = w_spec.codes(weight, blocks)
    out: dict[str, torch.Tensor] = {}
    if w_kind is Kind.INT4_BLOCK:
        out["weight"] = _pack_int4_rows(qt.codes, name)
        out["weight_scale"] = qt.scale.float()
    elif w_kind is Kind.NVFP4:
        if weight.shape[-1] % 2:
            raise _unsupported(name, f"NVFP4 weight has an odd input size ({weight.shape[-1]})")
        # -0 (code 8) is written as +0, as ModelOpt's packing does (same value)
        codes = torch.where(qt.codes == 8, torch.zeros_like(qt.codes), qt.codes)
        out["weight"] = qk.pack_fp4(codes).view(torch.uint8)
        out["weight_scale"] = qt.scale
        out["weight_scale_2"] = qt.global_scale.float().reshape(())
    else:
        out["weight"] = qt.codes
        scale = qt.scale.float()
        out["weight_scale"] = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
    input_scale = _activation_scale(name, i_spec, i_kind) if i_spec is not None else None
    if input_scale is not None:
        out["input_scale"] = input_scale
    if i_spec is not None and i_spec.pre_quant_scale is not None:
        out["pre_quant_scale"] = i_spec.pre_quant_scale.float().reshape(-1)
        if algo == "NVFP4":
            algo = "NVFP4_AWQ"
    if getattr(module, "low_rank_branch", None) is not None:
        if not algo.startswith("NVFP4"):
            raise _unsupported(name, f"SVDQuant low-rank branch on a {algo} layer")
        algo = "NVFP4_SVD"
    quantizers = (w_spec.name,) + ((i_spec.name,) if i_spec is not None else ())
    tensors = {k: v.contiguous() for k, v in out.items()}
    return LayerExport(algo, group_size, tensors, quantizers, (w_kind, i_kind))


def kv_specs(
    name: str, module: nn.Module, unsupported: Callable[[str, str], Exception] = _unsupported
) -> list[QuantizerSpec] | None:
    """Specs of the attention module's k/v_bmm_quantizers; None when neither is enabled."""
    q_bmm = getattr(module, "q_bmm_quantizer", None)
    if isinstance(q_bmm, TensorQuantizer) and q_bmm.is_enabled:
        raise unsupported(name, "query quantization (q_bmm_quantizer)")
    specs = [spec_of(f"{name}.{q}", getattr(module, q)) for q in KV_QUANTIZERS]
    return specs if any(s.enabled for s in specs) else None


def export_kv_scales(name: str, module: nn.Module) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(kv_cache_quant_algo, tensors) of the attention module ``name``'s k/v_bmm_quantizers.

    The scales are named as ModelOpt names them, ``<attn>.k_proj.k_scale`` and
    ``<attn>.v_proj.v_scale`` (vLLM maps both to its ``attn.k_scale`` / ``attn.v_scale``), or
    ``<attn>.k_scale`` / ``<attn>.v_scale`` when the module has no ``k_proj`` / ``v_proj``.
    An affine KV quantizer's static bias goes to ``k_bias`` / ``v_bias`` beside the scale.
    """
    specs = kv_specs(name, module)
    if specs is None:
        return None, {}
    algos = set()
    tensors: dict[str, torch.Tensor] = {}
    for letter, spec in zip("kv", specs):
        per_tensor = not spec.blocks and spec.axis is None and not spec.dynamic
        nvfp4 = spec.element == E2M1 and spec.format.has_global_amax
        if not spec.enabled or spec.element not in KV_FORMATS or not (per_tensor or nvfp4):
            described = spec.describe() if spec.enabled else "disabled"
            raise _unsupported(name, f"KV-cache quantizer {spec.name} ({described})")
        if spec.amax is None:
            raise _unsupported(name, f"KV-cache quantizer {spec.name} was never calibrated")
        algo, bound = KV_FORMATS[spec.element]
        algos.add(algo)
        prefix = f"{name}.{letter}_proj." if hasattr(module, f"{letter}_proj") else f"{name}."
        tensors[f"{prefix}{letter}_scale"] = (spec.amax.float().max() / bound).reshape(())
        quantizer = getattr(module, f"{letter}_bmm_quantizer")
        if quantizer.attribute_config.bias is not None:
            bias = quantizer._buffers.get("_bias_value")
            if bias is None:
                raise _unsupported(name, f"{spec.name} has a dynamic (per-batch) bias")
            tensors[f"{prefix}{letter}_bias"] = bias.detach().float().cpu().contiguous()
    if len(algos) > 1:
        raise _unsupported(name, f"keys and values use different formats {sorted(algos)}")
    return algos.pop(), tensors

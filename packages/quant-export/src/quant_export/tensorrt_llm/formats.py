"""Per-format tensors of one quantized linear layer in TensorRT-LLM's checkpoint (before fusion and splitting).

The layer's codes and scales come from :func:`quant_export.hf_formats.export_linear` (the same
codes the fake-quantized model computes) and are renamed and re-laid-out as TensorRT-LLM's
ModelOpt flow reads them. Sources: ``tensorrt_llm/quantization/layers.py`` (``FP8Linear``,
``Int8SmoothQuantLinear``, ``WeightOnlyGroupwiseQuantLinear`` parameters),
``tensorrt_llm/models/modeling_utils.py`` (``preprocess_perlayer_weights``: what each
``quant_algo`` does with the stored tensors at load), ``tensorrt_llm/models/convert_utils.py``
(``weight_only_quantize_dict``) and ModelOpt's writer ``modelopt/torch/export/model_config.py``
(``LinearConfig`` field names) / ``model_config_utils.py`` (``pack_linear_weights``) /
``quant_utils.py`` (``to_quantized_weight``, ``pack_int4_in_uint8``):

================================  ==========================================================
``quant_algo``                    tensors of layer ``L`` (``(out, in)`` logical layout)
================================  ==========================================================
``FP8``                           ``weight`` float8_e4m3fn; ``weights_scaling_factor`` and
                                  ``activation_scaling_factor`` fp32 ``(1,)`` (amax / 448)
``FP8_PER_CHANNEL_PER_TOKEN``     ``weight`` float8_e4m3fn; ``per_channel_scale`` fp32 ``(out,)``
``W8A8_SQ_PER_CHANNEL``           ``weight`` int8; ``weights_scaling_factor`` fp32 ``(out,)``;
                                  ``activation_scaling_factor`` fp32 ``(1,)``;
                                  ``prequant_scaling_factor`` ``(in,)`` (ones without smoothing)
``W8A16``                         ``weight`` in ``dtype`` holding the dequantized INT8 grid:
                                  TensorRT-LLM quantizes float weights per channel at load
                                  (``weight_only_quantize_dict``), recovering the same codes
``W4A16_AWQ``                     ``weight`` int8 ``(out / 2, in)``, INT4 two per byte along the
                                  output axis (row ``2r`` low nibble); ``weights_scaling_factor``
                                  fp32 ``(out, in / group)`` (TensorRT-LLM transposes it at load);
                                  ``prequant_scaling_factor`` ``(in,)`` when AWQ-smoothed
``W4A8_AWQ``                      as W4A16_AWQ, plus ``weights_scaling_factor_2`` (FP8 stage,
                                  amax / 448) and ``activation_scaling_factor`` fp32 ``(1,)``;
                                  ``prequant_scaling_factor`` always (the loader divides it by
                                  the activation scale and derives ``alpha``)
``NVFP4``                         ``weight`` uint8 ``(out, in / 2)`` (E2M1, column ``2c`` low
                                  nibble); ``weights_scaling_factor`` float8_e4m3fn
                                  ``(out, in / 16)``; ``weights_scaling_factor_2`` and
                                  ``activation_scaling_factor`` fp32 ``(1,)`` (amax / (6 * 448))
================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import quant_kernels as qk
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.hf_formats import Kind, LayerExport, export_linear, input_kind, weight_kind
from quant_export.quantizers import UnsupportedFormatError, spec_of

AWQ_ALGOS = ("W4A16_AWQ", "W4A8_AWQ")
GROUPED_ALGOS = (*AWQ_ALGOS, "NVFP4")


@dataclass
class TrtLinear:
    """One HF linear layer's tensors under TensorRT-LLM's leaf names (``weight``, ``bias``, scales)."""

    quant_algo: str | None
    group_size: int | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer_config(self) -> dict[str, Any]:
        """The layer's entry in ``quant_cfg.json`` (ModelOpt's ``process_layer_quant_config``)."""
        cfg: dict[str, Any] = {"quant_algo": self.quant_algo}
        if self.quant_algo in GROUPED_ALGOS:
            cfg["group_size"] = self.group_size
        if self.quant_algo in AWQ_ALGOS:
            cfg["has_zero_point"] = False
            cfg["pre_quant_scale"] = "prequant_scaling_factor" in self.tensors
        return cfg


_VERDICT = "TensorRT-LLM's checkpoint cannot hold it"
_HF_VERDICT = "it has no form in the Hugging Face (ModelOpt / vLLM) checkpoint"


def _unsupported(name: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(f"layer {name}: {why}; {_VERDICT}")


def _per_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(1).contiguous()


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight in (out, in) layout (an unconverted GPT-2 ``Conv1D`` stores (in, out))."""
    weight = module.weight.detach()
    conv1d = hasattr(module, "nf") and not isinstance(module, nn.Linear)
    return weight.t() if conv1d else weight


def _prequant(hf: LayerExport, in_features: int, dtype: torch.dtype, always: bool) -> dict:
    pqs = hf.tensors.get("pre_quant_scale")
    if pqs is None and not always:
        return {}
    if pqs is None:
        pqs = torch.ones(in_features)
    return {"prequant_scaling_factor": pqs.to(dtype)}


def _fp8(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = hf.tensors
    return {
        "weight": t["weight"],
        "weights_scaling_factor": _per_tensor(t["weight_scale"]),
        "activation_scaling_factor": _per_tensor(t["input_scale"]),
    }


def _fp8_per_channel(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"weight": hf.tensors["weight"], "per_channel_scale": hf.tensors["weight_scale"]}


def _int8_sq(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = hf.tensors
    return {
        "weight": t["weight"],
        "weights_scaling_factor": t["weight_scale"].float(),
        "activation_scaling_factor": _per_tensor(t["input_scale"]),
        **_prequant(hf, t["weight"].shape[1], dtype, always=True),
    }


def _w8a16(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = hf.tensors
    peak = t["weight"].abs().amax(dim=1)
    if bool(((peak != 127) & (peak != 0)).any()):
        # TensorRT-LLM re-derives each row's scale as absmax / 127: it meets ours only where a
        # code reaches 127 (amax at or below the row's largest weight).
        raise UnsupportedFormatError(
            f"W8A16 layer with {int(((peak != 127) & (peak != 0)).sum())} row(s) whose largest "
            "INT8 code is below 127 (amax above the row's largest weight): TensorRT-LLM derives "
            "W8A16 scales from the weights at load and would quantize them differently; "
            "calibrate the weights with max"
        )
    grid = t["weight"].double() * t["weight_scale"].double().reshape(-1, 1)
    return {"weight": grid.to(dtype)}


def _w4a16_awq(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = hf.tensors
    return {
        "weight": t["weight"].view(torch.int8),
        "weights_scaling_factor": t["weight_scale"].float(),
        **_prequant(hf, t["weight"].shape[1], dtype, always=False),
    }


def _nvfp4(hf: LayerExport, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = hf.tensors
    return {
        "weight": t["weight"],
        "weights_scaling_factor": t["weight_scale"],
        "weights_scaling_factor_2": _per_tensor(t["weight_scale_2"]),
        "activation_scaling_factor": _per_tensor(t["input_scale"]),
    }


# ModelOpt quant_algo of the unified HF layout -> TensorRT-LLM QuantAlgo and tensor writer.
WRITERS: dict[str, tuple[str, Callable[[LayerExport, torch.dtype], dict[str, torch.Tensor]]]] = {
    "FP8": ("FP8", _fp8),
    "FP8_PER_CHANNEL_PER_TOKEN": ("FP8_PER_CHANNEL_PER_TOKEN", _fp8_per_channel),
    "W8A8_SQ_PER_CHANNEL": ("W8A8_SQ_PER_CHANNEL", _int8_sq),
    "W8A16": ("W8A16", _w8a16),
    "W4A16_AWQ": ("W4A16_AWQ", _w4a16_awq),
    "NVFP4": ("NVFP4", _nvfp4),
}


def _w4a8_awq(name: str, module: nn.Module, dtype: torch.dtype) -> TrtLinear:
    """W4A8_AWQ: INT4 blocks then a per-tensor FP8 stage on the weight, static FP8 input."""
    wq, iq = module.weight_quantizer, getattr(module, "input_quantizer", None)
    stages = [spec_of(f"{name}.weight_quantizer.{i}", q) for i, q in enumerate(wq)]
    i_spec = spec_of(f"{name}.input_quantizer", iq) if isinstance(iq, TensorQuantizer) else None
    kinds = [weight_kind(s, 2) if s.enabled else None for s in stages]
    if (
        kinds != [Kind.INT4_BLOCK, Kind.FP8_TENSOR]
        or i_spec is None
        or input_kind(i_spec) is not Kind.FP8_TENSOR
    ):
        described = " then ".join(s.describe() for s in stages)
        raise _unsupported(name, f"multi-stage weight quantizer {described} is not W4A8_AWQ")
    if stages[1].amax is None or i_spec.amax is None:
        raise _unsupported(name, "W4A8 FP8 stage or input quantizer was never calibrated")
    weight = linear_weight(module).float()
    if weight.shape[0] % 2:
        raise _unsupported(name, f"INT4 weight has an odd number of rows ({weight.shape[0]})")
    blocks = {a % 2: b for a, b in stages[0].blocks.items()}
    qt = stages[0].codes(weight, blocks)
    packed = qk.pack_int4(qt.codes.t().contiguous()).t().contiguous()  # rows 2r, 2r + 1 per byte
    pqs = i_spec.pre_quant_scale
    return TrtLinear(
        "W4A8_AWQ",
        blocks[1],
        {
            "weight": packed.view(torch.int8),
            "weights_scaling_factor": qt.scale.float().contiguous(),
            "weights_scaling_factor_2": _per_tensor(stages[1].amax / stages[1].element.max_value),
            "activation_scaling_factor": _per_tensor(i_spec.amax / i_spec.element.max_value),
            "prequant_scaling_factor": (
                torch.ones(weight.shape[1]) if pqs is None else pqs.reshape(-1)
            ).to(dtype),
        },
    )


def export_trt_linear(name: str, module: nn.Module, dtype: torch.dtype) -> TrtLinear:
    """TensorRT-LLM tensors of one HF linear layer (quantized or not); bias in ``dtype``."""
    wq = getattr(module, "weight_quantizer", None)
    if isinstance(wq, SequentialQuantizer) and wq.is_enabled:
        out = _w4a8_awq(name, module, dtype)
    else:
        try:
            hf = export_linear(name, module) if isinstance(wq, TensorQuantizer) else None
        except UnsupportedFormatError as err:  # worded for the HF layout; same verdict here
            raise UnsupportedFormatError(str(err).replace(_HF_VERDICT, _VERDICT)) from None
        if hf is None:
            out = TrtLinear(None, tensors={"weight": _float_weight(module).to(dtype)})
        elif hf.quant_algo not in WRITERS:
            raise _unsupported(name, f"its format {hf.quant_algo}")
        else:
            algo, writer = WRITERS[hf.quant_algo]
            try:
                out = TrtLinear(algo, hf.group_size, writer(hf, dtype))
            except UnsupportedFormatError as err:
                raise _unsupported(name, str(err)) from None
    bias = getattr(module, "bias", None)
    if bias is not None:
        out.tensors["bias"] = bias.detach().to(dtype)
    out.tensors = {k: v.detach().cpu().contiguous() for k, v in out.tensors.items()}
    return out


def _float_weight(module: nn.Module) -> torch.Tensor:
    """An unquantized layer's weight with any pre-quant scales folded in (exact: (x s) W^T = x (W s)^T)."""
    weight = linear_weight(module).float()
    for q in (getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)):
        scale = getattr(q, "pre_quant_scale", None)
        if scale is not None:
            weight = weight * scale.float()
    return weight

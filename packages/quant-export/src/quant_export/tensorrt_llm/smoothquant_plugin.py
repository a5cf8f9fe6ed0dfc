"""INT8 SmoothQuant in TensorRT-LLM's plugin layout (``W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN``).

TensorRT-LLM's own SmoothQuant flow (``tensorrt_llm/quantization/layers.py``:
``SmoothQuantRmsNorm`` / ``SmoothQuantLayerNorm``, ``SmoothQuantAttention``,
``SmoothQuantGatedMLP`` / ``SmoothQuantMLP``, ``SmoothQuantLinear`` / ``SmoothQuantRowLinear``;
names as ``get_tllm_linear_sq_weight`` in ``tensorrt_llm/models/llama/convert.py`` writes them)
has no pre-quant scale on layers fed by a norm and quantizes activations inside the norm:

* ``input_layernorm`` / ``post_layernorm``: ``weight`` (and ``bias``) times the shared
  ``pre_quant_scale`` of the layers they feed (smoothing folded into the norm, as TensorRT-LLM's
  ``smooth_gemm`` does), and ``scale_to_int`` ``(1,)`` = 1 / activation scale (127 / amax).
* ``attention.dense`` / ``mlp.proj``: ``smoother`` fp32 ``(1, in)`` = 1 / ``pre_quant_scale``
  (the input is divided by it), and the activation quantizer's multiplier in
  ``attention.quantization_scaling_factor`` / ``mlp.quantization_scaling_factor`` fp32 ``(1,)``.
* every layer: ``weight`` int8 ``(out, in)``, ``per_channel_scale`` fp32 ``(1, out)`` and
  ``act_scale`` fp32 ``(1, 1)``: the GEMM plugin (``smooth_quant_gemm``) multiplies the int32
  accumulator by both, so ``per_channel_scale`` = activation scale x weight scale per channel and
  ``act_scale`` = 1 (TensorRT-LLM's converter splits the same product as
  ``scale_y_accum_quant`` x ``scale_y_quant_orig`` around an output range this export has no
  use for).
"""

from __future__ import annotations

import torch

from quant_export.quantizers import UnsupportedFormatError
from quant_export.tensorrt_llm.formats import TrtLinear

PLUGIN_ALGO = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
SOURCE_ALGO = "W8A8_SQ_PER_CHANNEL"
# TensorRT-LLM layer -> the norm that quantizes its input (column layers) ...
NORM_BEFORE = {
    "attention.qkv": "input_layernorm",
    "mlp.fc": "post_layernorm",
    "mlp.gate": "post_layernorm",
}
# ... or the module whose quantization_scaling_factor does (row layers)
ROW_QUANTIZER = {"attention.dense": "attention", "mlp.proj": "mlp"}


def _unsupported(name: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(f"layer {name}: {why}; no {PLUGIN_ALGO} form")


def _column(
    name: str, parts: list[TrtLinear], replicated: dict, dtype: torch.dtype, seen: dict
) -> None:
    """Fold the layer's smoothing into the norm before it and give the norm its ``scale_to_int``."""
    norm = name.rsplit(".", 2)[0] + "." + NORM_BEFORE[name.split(".", 3)[-1]]
    first = parts[0].tensors
    pqs = first["prequant_scaling_factor"].float()
    scale_to_int = (1.0 / first["activation_scaling_factor"].float()).to(dtype)
    if norm in seen:  # a second layer fed by the same norm (fc and gate)
        if not (torch.equal(seen[norm][0], scale_to_int) and torch.equal(seen[norm][1], pqs)):
            raise _unsupported(name, f"its input scales differ from the other layers after {norm}")
        return
    seen[norm] = (scale_to_int, pqs)
    replicated[f"{norm}.scale_to_int"] = scale_to_int
    for leaf in ("weight", "bias"):
        if f"{norm}.{leaf}" in replicated:
            value = replicated[f"{norm}.{leaf}"]
            replicated[f"{norm}.{leaf}"] = (value.float() * pqs).to(value.dtype)


def convert(linears: dict, replicated: dict, dtype: torch.dtype) -> None:
    """Rewrite collected W8A8_SQ_PER_CHANNEL layers (and their norms) into the plugin layout, in place."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (_, parts) in linears.items():
        if name == "lm_head" and parts[0].quant_algo is None:
            continue
        kind = name.split(".", 3)[-1]
        if parts[0].quant_algo != SOURCE_ALGO or kind not in {**NORM_BEFORE, **ROW_QUANTIZER}:
            raise _unsupported(name, f"it is {parts[0].quant_algo}, not {SOURCE_ALGO}")
        if kind in NORM_BEFORE:
            _column(name, parts, replicated, dtype, seen)
        else:
            prefix = name.rsplit(".", 2)[0]
            act = parts[0].tensors["activation_scaling_factor"].float()
            replicated[f"{prefix}.{ROW_QUANTIZER[kind]}.quantization_scaling_factor"] = 1.0 / act
        for part in parts:
            t = part.tensors
            act = t["activation_scaling_factor"].float().reshape(())
            new = {
                "weight": t["weight"],
                "per_channel_scale": t["weights_scaling_factor"].float() * act,
                "act_scale": torch.ones(1),
            }
            if kind in ROW_QUANTIZER:
                new["smoother"] = 1.0 / t["prequant_scaling_factor"].float()
            if "bias" in t:
                new["bias"] = t["bias"]
            part.tensors, part.quant_algo = new, PLUGIN_ALGO


def shape_ranks(ranks: list[dict[str, torch.Tensor]]) -> None:
    """The plugin's parameter shapes: ``per_channel_scale`` / ``smoother`` (1, n), ``act_scale`` (1, 1)."""
    for rank in ranks:
        for key, value in rank.items():
            if key.endswith((".per_channel_scale", ".smoother")):
                rank[key] = value.reshape(1, -1).contiguous()
            elif key.endswith(".act_scale"):
                rank[key] = value.reshape(1, 1).contiguous()

"""Mixtral-style MoE layers as TensorRT-LLM's ``MixtureOfExperts`` stores them.

From ``tensorrt_llm/layers/moe.py``: ``mlp.router.weight`` (num_experts, hidden) in float32,
never split or quantized; ``mlp.fc.weight`` (experts, 2 * inter, hidden) holding, per expert,
``[w3 (up); w1 (gate)]`` (the half the activation applies to comes second); ``mlp.proj.weight``
(experts, hidden, inter). FP8 (``MOEWeightWrapper``): ``weights_scaling_factor`` fp32
(experts, 1) and one ``activation_scaling_factor`` fp32 (1,) per projection. Tensor parallelism
splits each half of ``fc`` along ``inter`` and ``proj`` along its input (ModelOpt:
``modelopt/torch/export/postprocess.py``, ``ExpertConfig`` branch). The weight-only and NVFP4 MoE
kernels keep their own weight layouts, so only unquantized and FP8 experts are written here.
"""

from __future__ import annotations

import torch
from torch import nn

from quant_export.quantizers import UnsupportedFormatError
from quant_export.tensorrt_llm.formats import TrtLinear, export_trt_linear
from quant_export.tensorrt_llm.split import chunks

MOE_ALGOS = (None, "FP8")


class _ExpertSlice(nn.Module):
    """One expert's projection of an unquantized fused-experts module, as an (out, in) linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight


def _projections(experts: nn.Module, which: str) -> list[nn.Module]:
    quantized = getattr(experts, f"quant_{which}", None)
    if quantized is not None:  # quant-llm's QuantFusedExperts: one ExpertProjection per expert
        return list(quantized)
    param = getattr(experts, "gate_up_proj" if which == "up_proj" else "down_proj")
    transposed = getattr(experts, "is_transposed", False)
    return [_ExpertSlice(p.t() if transposed else p) for p in param]


def export_experts(name: str, experts: nn.Module, dtype: torch.dtype) -> dict[str, TrtLinear]:
    """``{"fc": ..., "proj": ...}`` with the experts stacked (names: ``name`` is the HF module)."""
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise UnsupportedFormatError(
            f"MoE layer {name}: experts with biases or without a gate have no TensorRT-LLM form here"
        )
    out = {}
    for which, trt in (("up_proj", "fc"), ("down_proj", "proj")):
        layers = [
            export_trt_linear(f"{name}.{which}.{e}", m, dtype)
            for e, m in enumerate(_projections(experts, which))
        ]
        algos = {layer.quant_algo for layer in layers}
        if len(algos) != 1 or not algos <= set(MOE_ALGOS):
            raise UnsupportedFormatError(
                f"MoE layer {name}: expert formats {sorted(map(str, algos))}; TensorRT-LLM's "
                f"MoE checkpoint here holds one of {list(MOE_ALGOS)} for all experts"
            )
        weights = [layer.tensors["weight"] for layer in layers]
        if which == "up_proj":  # HF [gate; up] -> TensorRT-LLM [up; gate]
            weights = [torch.cat(list(reversed(w.chunk(2, dim=0)))) for w in weights]
        tensors = {"weight": torch.stack(weights)}
        if algos == {"FP8"}:
            tensors["weights_scaling_factor"] = torch.stack(
                [layer.tensors["weights_scaling_factor"] for layer in layers]
            )
            scales = torch.stack([layer.tensors["activation_scaling_factor"] for layer in layers])
            if not torch.equal(scales.amin(), scales.amax()):
                raise UnsupportedFormatError(
                    f"MoE layer {name}: experts' {which} inputs have different FP8 scales"
                )
            tensors["activation_scaling_factor"] = scales[0]
        out[trt] = TrtLinear(algos.pop(), tensors=tensors)
    return out


def split_experts(
    prefix: str, layers: dict[str, TrtLinear], tp: int
) -> list[dict[str, torch.Tensor]]:
    """Per-rank ``prefix.fc.*`` / ``prefix.proj.*`` tensors."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for trt, layer in layers.items():
        for leaf, t in layer.tensors.items():
            key = f"{prefix}.{trt}.{leaf}"
            if leaf != "weight":
                pieces = [t] * tp
            elif trt == "fc":
                up, gate = t.chunk(2, dim=1)
                pieces = [
                    torch.cat([u, g], dim=1)
                    for u, g in zip(chunks(up, tp, 1, key), chunks(gate, tp, 1, key))
                ]
            else:
                pieces = chunks(t, tp, 2, key)
            for rank, piece in zip(ranks, pieces):
                rank[key] = piece.contiguous()
    return ranks

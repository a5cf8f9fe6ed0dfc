"""Linear layers that read the same input (q/k/v, gate/up) and the scales that engines fuse across them.

vLLM and TensorRT-LLM run such layers as one fused GEMM (``qkv_proj``, ``gate_up_proj``) with one
NVFP4 global weight scale (``weight_scale_2``): block scales computed against a different global
scale would be misread. ModelOpt's export therefore gives every NVFP4 layer of a group the
group's largest global amax before storing codes; :func:`share_nvfp4_global_amax` does the same.
Groups are found from one forward pass on the model's dummy inputs, with pre-forward hooks noting
which Linear layers receive the very same tensor (:func:`quant_export.prequant_fold.input_sources`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from quant_core.diagnostics import QuantWarning
from quant_core.nn import TensorQuantizer
from quant_export.prequant_fold import input_sources
from quant_export.quantizers import UnsupportedFormatError


def shared_input_groups(model: nn.Module, inputs: dict[str, Any] | None = None) -> list[list[str]]:
    """Names of the ``nn.Linear`` layers that receive the same input tensor, in groups of two or more.

    ``inputs`` are keyword inputs of one forward pass; by default ``model.dummy_inputs``
    (transformers) or two token ids.
    """
    groups, _ = input_sources(model, inputs)
    return [names for names in groups.values() if len(names) > 1]


def _nvfp4_weight_quantizer(module: nn.Module) -> TensorQuantizer | None:
    q = getattr(module, "weight_quantizer", None)
    if isinstance(q, TensorQuantizer) and q.is_enabled and q.format.has_global_amax:
        # four over six (and LSQ, whose amax is None) are refused by name when collected
        return q if q.amax is not None and not q.format.four_over_six else None
    return None


def share_fused_nvfp4_scales(model: nn.Module, share: bool = True) -> list[list[str]]:
    """:func:`share_nvfp4_global_amax` over the model's :func:`shared_input_groups` when it has
    enabled NVFP4 weight quantizers (no forward pass otherwise); returns the groups changed.

    With ``share=False`` nothing changes, but a warning names the groups whose global scales
    differ: fused engine kernels (vLLM, SGLang, TensorRT-LLM) would misread them."""
    if not any(_nvfp4_weight_quantizer(m) for m in model.modules()):
        return []
    groups = shared_input_groups(model)
    if share:
        return share_nvfp4_global_amax(model, groups)
    modules = dict(model.named_modules())
    for names in groups:
        quantizers = [q for n in names if (q := _nvfp4_weight_quantizer(modules[n]))]
        amaxes = {q.format.global_amax(q.amax).item() for q in quantizers}
        if len(amaxes) > 1:
            warnings.warn(
                f"layers {', '.join(names)} keep different NVFP4 global weight scales "
                "(share_fused_scales=False): loaders that keep per-layer scales (transformers) "
                "read them right; vLLM, SGLang and TensorRT-LLM fuse these layers with the "
                "largest scale and would compute wrong outputs",
                QuantWarning,
                stacklevel=3,
            )
    return []


def share_nvfp4_global_amax(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Give the NVFP4 weight quantizers of each group their largest global amax; returns the groups changed.

    This changes the model's quantizers (as ModelOpt's export does), so the model keeps computing
    exactly what the checkpoint stores. Static (per-block calibrated) NVFP4 weights derive their
    global amax from their block amaxes and cannot take another without re-rounding: a group of
    them with different global amaxes is refused (vLLM and SGLang would apply the shards' largest
    global scale to every shard: ``weight_scale_2.max()`` / ``weight_global_scale.max()`` in their
    ModelOpt and compressed-tensors NVFP4 linear methods).
    """
    modules = dict(model.named_modules())
    changed = []
    for names in groups:
        members = [(n, q) for n in names if (q := _nvfp4_weight_quantizer(modules[n]))]
        if len(members) < 2:
            continue
        amaxes = [q.format.global_amax(q.amax).reshape(()) for _, q in members]
        shared = torch.stack(amaxes).max()
        if all(a == shared for a in amaxes):
            continue
        static = [n for n, q in members if not q.format.dynamic]
        if static:
            values = ", ".join(f"{n}: {a.item():.6g}" for (n, _), a in zip(members, amaxes))
            raise UnsupportedFormatError(
                f"layers {', '.join(names)} read the same input, and engines run them as one "
                f"GEMM with one NVFP4 global weight scale, but their NVFP4 weights have different "
                f"global amaxes ({values}) and {', '.join(static)} are static (per-block amaxes "
                "from calibration), which cannot take another global scale without re-rounding. "
                "Calibrate these weights with max (dynamic NVFP4 weights are given the group's "
                "global amax here), or for a loader that keeps per-layer scales (transformers) "
                "pass share_fused_scales=False"
            )
        for _, q in members:
            q.amax = shared.reshape(q.amax.shape)
        changed.append(names)
    return changed

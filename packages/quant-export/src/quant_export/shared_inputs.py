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


def shared_input_groups(model: nn.Module, inputs: dict[str, Any] | None = None) -> list[list[str]]:
    """Names of the ``nn.Linear`` layers that receive the same input tensor, in groups of two or more.

    ``inputs`` are keyword inputs of one forward pass; by default ``model.dummy_inputs``
    (transformers) or two token ids.
    """
    groups, _ = input_sources(model, inputs)
    return [names for names in groups.values() if len(names) > 1]


def _is_nvfp4(q: nn.Module) -> bool:
    # four over six (and LSQ, whose amax is None) are refused by name when collected
    return (
        isinstance(q, TensorQuantizer)
        and q.is_enabled
        and q.format.has_global_amax
        and q.amax is not None
        and not q.format.four_over_six
    )


def _nvfp4_weight_quantizer(module: nn.Module) -> TensorQuantizer | None:
    q = getattr(module, "weight_quantizer", None)
    return q if q is not None and _is_nvfp4(q) else None


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
        _, amaxes = _global_amaxes([getattr(modules[n], "weight_quantizer", None) for n in names])
        if len({a.item() for a in amaxes}) > 1:
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
    exactly what the checkpoint stores: a dynamic quantizer's calibrated amax becomes the shared
    one, a static (per-block calibrated) quantizer keeps its block amaxes and gets the shared
    `TensorQuantizer.global_amax` (its block scales are rounded to E4M3 under it). Engines apply
    one global scale to the fused GEMM: vLLM and SGLang take the shards' ``max()``
    (``weight_scale_2`` in their ModelOpt and ``weight_global_scale`` in their compressed-tensors
    NVFP4 linear methods).
    """
    modules = dict(model.named_modules())
    return [
        names
        for names in groups
        if share_global_amax([getattr(modules[n], "weight_quantizer", None) for n in names])
    ]


def share_global_amax(quantizers: list[object]) -> bool:
    """Give the enabled, calibrated NVFP4 quantizers in the list their largest global amax (see
    :func:`share_nvfp4_global_amax`); True when one changed."""
    found, amaxes = _global_amaxes(quantizers)
    if len(found) < 2:
        return False
    shared = torch.stack(amaxes).max()
    if all(a == shared for a in amaxes):
        return False
    for q in found:
        if q.format.dynamic:
            q.amax = shared.reshape(q.amax.shape)
        else:
            q.global_amax = shared
    return True


def _global_amaxes(quantizers: list[object]) -> tuple[list[TensorQuantizer], list[torch.Tensor]]:
    """The enabled, calibrated NVFP4 quantizers in the list and the global amax each uses."""
    found = [q for q in quantizers if isinstance(q, nn.Module) and _is_nvfp4(q)]
    return found, [q.effective_global_amax(q.amax).reshape(()) for q in found]

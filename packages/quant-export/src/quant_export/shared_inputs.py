"""Linear layers that read the same input (q/k/v, gate/up) and the scales that engines fuse across them.

vLLM and TensorRT-LLM run such layers as one fused GEMM (``qkv_proj``, ``gate_up_proj``) with one
NVFP4 global weight scale (``weight_scale_2``): block scales computed against a different global
scale would be misread. ModelOpt's export therefore gives every NVFP4 layer of a group the
group's largest global amax before storing codes; :func:`share_nvfp4_global_amax` does the same.
Groups are found from one forward pass on the model's dummy inputs, with pre-forward hooks noting
which Linear layers receive the very same tensor (:func:`quant_export.prequant_fold.input_sources`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant_core.nn import TensorQuantizer
from quant_export.prequant_fold import input_sources


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
        return q if q.amax is not None and q.amax.numel() == 1 else None
    return None


def share_nvfp4_global_amax(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Give the NVFP4 weight quantizers of each group their largest global amax; returns the groups changed.

    This changes the model's quantizers (as ModelOpt's export does), so the model keeps computing
    exactly what the checkpoint stores.
    """
    modules = dict(model.named_modules())
    changed = []
    for names in groups:
        quantizers = [q for q in (_nvfp4_weight_quantizer(modules[n]) for n in names) if q]
        if len(quantizers) < 2:
            continue
        shared = torch.stack([q.amax.reshape(()) for q in quantizers]).max()
        if any(q.amax.reshape(()) != shared for q in quantizers):
            for q in quantizers:
                q.amax = shared.reshape(q.amax.shape)
            changed.append(names)
    return changed

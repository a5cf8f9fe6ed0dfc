"""Make the quantizers of layers that TensorRT-LLM fuses into one GEMM agree, in the model itself.

TensorRT-LLM runs q/k/v as one ``attention.qkv`` GEMM and all experts of an MoE layer as one
plugin call, so such layers must share one activation scale, one per-tensor weight scale (FP8,
the FP8 stage of W4A8, the NVFP4 global scale) and one ``pre_quant_scale``; its attention reads
one ``kv_cache_scaling_factor`` for keys and values. This module changes the model's quantizers as
ModelOpt's export does before it writes a TensorRT-LLM checkpoint
(``modelopt/torch/export/quant_utils.py``: ``preprocess_linear_fusion`` — resmooth to the mean
``pre_quant_scale``, folding ``old / new`` into each weight and max-recalibrating the weight;
the largest input and per-tensor weight amax for the group), so the model afterwards computes
exactly what the checkpoint holds.
"""

from __future__ import annotations

import torch
from torch import nn

from quant_core.algorithms.mse import recalibrate_weight
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.shared_inputs import share_global_amax
from quant_kernels import ElementFormat


def _scalar_static(q: object) -> bool:
    # Static per-tensor amax; NVFP4 quantizers with dynamic blocks keep their global amax here too.
    return (
        isinstance(q, TensorQuantizer)
        and q.is_enabled
        and q.amax is not None
        and q.amax.numel() == 1
    )


def share_amax(quantizers: list[object]) -> bool:
    """Give every static per-tensor quantizer in the list the largest amax; True when one changed."""
    found = [q for q in quantizers if _scalar_static(q)]
    if len(found) < 2:
        return False
    shared = torch.stack([q.amax.detach().float().reshape(()) for q in found]).max()
    changed = any(q.amax.reshape(()) != shared for q in found)
    for q in found:
        q.amax = shared.reshape(q.amax.shape).to(q.amax.dtype)
    return changed


def _resmooth(modules: list[nn.Module]) -> bool:
    """Give the modules one input ``pre_quant_scale`` (their mean), folding the ratio into the weights."""
    scales = [getattr(m.input_quantizer, "pre_quant_scale", None) for m in modules]
    if all(s is None for s in scales):
        return False
    if any(s is None for s in scales):
        raise ValueError("some layers of a fused group carry a pre_quant_scale and others do not")
    mean = torch.stack([s.float() for s in scales]).mean(dim=0)
    changed = False
    with torch.no_grad():
        for module, old in zip(modules, scales):
            if torch.equal(old.float(), mean):
                continue
            weight = module.weight
            weight.copy_((weight.float() * old.float() / mean).to(weight.dtype))
            module.input_quantizer.pre_quant_scale = mean.to(old.dtype)
            recalibrate_weight(module)
            changed = True
    return changed


def fuse_group(modules: list[nn.Module]) -> bool:
    """Prepare layers that TensorRT-LLM runs as one GEMM; True when the model changed."""
    changed = _resmooth(modules)
    changed |= share_amax([getattr(m, "input_quantizer", None) for m in modules])
    weights = [getattr(m, "weight_quantizer", None) for m in modules]
    stages = [w[-1] if isinstance(w, SequentialQuantizer) else w for w in weights]
    changed |= share_amax(stages)
    changed |= share_global_amax(stages)  # static NVFP4 weights (per-block amaxes)
    return changed


def share_kv(attention: nn.Module) -> bool:
    """One scale for keys and values (TensorRT-LLM's ``kv_cache_scaling_factor``)."""
    return share_amax(
        [getattr(attention, "k_bmm_quantizer", None), getattr(attention, "v_bmm_quantizer", None)]
    )


def fit_w4a8_group_scales(module: nn.Module) -> bool:
    """Put a W4A8 layer's scales where TensorRT-LLM's W4A8_AWQ loader keeps them exactly.

    The loader stores ``weights_scaling_factor / weights_scaling_factor_2`` in fp16
    (``modeling_utils.preprocess_perlayer_weights``), so the GEMM sees ``fp8(code * fp16(ratio))``
    times ``weights_scaling_factor_2``. The FP8 stage's scale is rounded up to a power of two (FP8
    keeps its relative precision; values only move down a binade) and each INT4 group scale to
    ``fp16(ratio) x`` that scale (at most 2**-11 relative): then every product is exact on both
    sides and the engine's weights equal the model's. True when the model changed.
    """
    wq = getattr(module, "weight_quantizer", None)
    if not isinstance(wq, SequentialQuantizer) or len(wq) != 2 or not wq.is_enabled:
        return False
    int4, fp8 = wq
    if int4.amax is None or fp8.amax is None or fp8.amax.numel() != 1:
        return False
    int4_max = ElementFormat.parse(int4.num_bits).max_value
    fp8_max = ElementFormat.parse(fp8.num_bits).max_value
    fp8_scale = torch.exp2(torch.ceil(torch.log2(fp8.amax.detach().float() / fp8_max)))
    ratio = int4.amax.detach().float() / int4_max / fp8_scale
    fitted = ratio.half().float() * fp8_scale * int4_max
    changed = not torch.equal(fitted, int4.amax.float()) or not torch.equal(
        fp8_scale * fp8_max, fp8.amax.float()
    )
    int4.amax = fitted.to(int4.amax.dtype)
    fp8.amax = (fp8_scale * fp8_max).to(fp8.amax.dtype)
    return changed

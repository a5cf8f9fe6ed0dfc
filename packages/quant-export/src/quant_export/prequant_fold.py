"""Fold SmoothQuant / AWQ pre-quant scales into the layers that produce the scaled input.

An input quantizer's ``pre_quant_scale`` ``s`` multiplies the activations ``x`` before the Linear:
``y = Q(x · s) Q(W)ᵀ``. Engines that fuse layers reading one input (q/k/v, gate/up) into one GEMM
need one ``s`` per input, and the compressed-tensors layout has no pre-quant scale at all. So, as
ModelOpt's export does, this module

1. **resmooths** the layers that read the same tensor to one shared scale ``s̄`` (their mean):
   each weight becomes ``W · s / s̄`` (then max-recalibrated), and a static per-tensor input amax
   becomes an upper bound of ``|x · s̄|`` derived from the old one;
2. **folds** ``s̄`` into the producer of that tensor where one can absorb it exactly: a preceding
   RMSNorm / LayerNorm (its weight and bias times ``s̄``; checked numerically on the module itself),
   or, with ``into_producers``, the output rows of the layer named in :data:`ROW_PRODUCERS`
   (``down_proj`` reads ``act(gate) · up``, so ``up_proj``'s rows can take the scale; ``o_proj``
   reads attention over ``v_proj``'s output, per KV head). A producer with per-row weight scales
   (INT4 groups, per-channel) takes the factor exactly (same codes); one with per-tensor or
   two-level scales (FP8, NVFP4) is re-rounded (max-recalibrated).

Every step changes the model itself, so the fake-quantized model keeps computing what an exported
checkpoint stores: norm folding is exact; resmoothing and row folding re-round the touched weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant_core.algorithms.mse import recalibrate_weight
from quant_core.nn import TensorQuantizer
from quant_export.quantizers import UnsupportedFormatError

# Linear that reads a non-norm input -> sibling Linear whose output rows feed it linearly
# (llm-compressor keeps the same facts as data in its AWQ mappings).
ROW_PRODUCERS: dict[str, str] = {"down_proj": "up_proj", "o_proj": "v_proj", "w2": "w3"}
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


@dataclass
class FoldReport:
    """What :func:`fold_pre_quant_scales` did: layer names per action."""

    resmoothed: list[list[str]] = field(default_factory=list)
    into_norms: dict[str, list[str]] = field(default_factory=dict)
    into_rows: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)


def _pqs(module: nn.Module) -> torch.Tensor | None:
    iq = getattr(module, "input_quantizer", None)
    return iq.pre_quant_scale if isinstance(iq, TensorQuantizer) else None


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, _NORM_TYPES) or (
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def input_sources(
    model: nn.Module, inputs: dict[str, Any] | None = None
) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Linear layers grouped by the tensor they read, and each group's producing module.

    One forward pass on ``inputs`` (default: the model's dummy inputs); returns
    ``{first layer: [layers reading that tensor]}`` and ``{first layer: producer name or None}``.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    groups: dict[str, list[str]] = {}
    producer: dict[str, str | None] = {}
    first_reader: dict[int, tuple[torch.Tensor, str]] = {}

    def after(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and id(out) not in outputs:
                outputs[id(out)] = (out, name)

        return hook

    def before(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            seen = first_reader.get(id(x))
            if seen is not None and seen[0] is x:
                groups[seen[1]].append(name)
                return
            first_reader[id(x)] = (x, name)
            groups[name] = [name]
            made = outputs.get(id(x))
            producer[name] = made[1] if made is not None and made[0] is x else None

        return hook

    hooks = [m.register_forward_pre_hook(before(n)) for n, m in linears.items()]
    hooks += [m.register_forward_hook(after(n)) for n, m in model.named_modules() if _is_norm(m)]
    if inputs is None:
        inputs = getattr(model, "dummy_inputs", None) or {"input_ids": torch.tensor([[0, 1]])}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return groups, producer


def _set_input_scale(module: nn.Module, new: torch.Tensor | None) -> None:
    """Replace the layer's pre-quant scale by ``new`` keeping its function: W ← W · old / new."""
    iq = module.input_quantizer
    old = iq.pre_quant_scale
    old_f = torch.ones_like(module.weight[0], dtype=torch.float32) if old is None else old.float()
    new_f = torch.ones_like(old_f) if new is None else new.float().to(old_f.device)
    ratio = old_f / new_f
    if torch.equal(ratio, torch.ones_like(ratio)):
        iq.pre_quant_scale = None if new is None else new_f
        return
    module.weight.mul_(ratio.to(module.weight.dtype))
    lora_a = getattr(module, "svdquant_lora_a", None)
    if isinstance(lora_a, torch.Tensor):  # SVDQuant's low-rank branch reads x · pre_quant_scale too
        lora_a.mul_(ratio.to(lora_a))
    if iq.is_enabled and not iq.is_dynamic and iq.amax is not None and iq.amax.numel() == 1:
        # |x · new| <= |x · old| · max(new / old): an upper bound of the new input amax
        iq.amax = iq.amax * (new_f / old_f).max()
    iq.pre_quant_scale = None if new is None else new_f
    wq = getattr(module, "weight_quantizer", None)
    if isinstance(wq, nn.Module) and getattr(wq, "is_enabled", False):
        recalibrate_weight(module)


def _fold_into_norm(norm: nn.Module, scale: torch.Tensor) -> bool:
    """norm(x) · scale by scaling its weight (and bias); False (norm unchanged) if not exact."""
    probe = torch.randn(3, scale.numel(), generator=torch.Generator().manual_seed(0))
    probe = probe.to(norm.weight.device, norm.weight.dtype)
    before = norm(probe).float() * scale.to(probe.device)
    saved = {k: v.detach().clone() for k, v in norm.named_parameters(recurse=False)}
    for key in ("weight", "bias"):
        p = getattr(norm, key, None)
        if isinstance(p, torch.Tensor):
            p.mul_(scale.to(p.device, p.dtype))
    after = norm(probe).float()
    if torch.allclose(after, before, rtol=1e-5, atol=1e-6 * before.abs().max().item()):
        return True
    for key, value in saved.items():
        getattr(norm, key).copy_(value)
    return False


def _fold_into_rows(model: nn.Module, name: str, scale: torch.Tensor) -> str | None:
    """Fold ``name``'s pre-quant scale into its ROW_PRODUCERS sibling's output rows; the sibling's name."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in ROW_PRODUCERS:
        return None
    parent = model.get_submodule(parent_name)
    producer = getattr(parent, ROW_PRODUCERS[leaf], None)
    if not isinstance(producer, nn.Linear):
        return None
    v_bmm = getattr(parent, "v_bmm_quantizer", None)
    if leaf == "o_proj" and isinstance(v_bmm, TensorQuantizer) and v_bmm.is_enabled:
        return None  # scaling V would change its (per-tensor) KV-cache quantization
    rows = producer.out_features
    if scale.numel() != rows:  # GQA: o_proj reads each KV head's values several times
        if scale.numel() % rows:
            return None
        repeats = scale.numel() // rows
        head_dim = getattr(parent, "head_dim", None)
        if head_dim is None or rows % head_dim:
            return None
        per_kv = scale.float().reshape(rows // head_dim, repeats, head_dim).mean(1)
        _set_input_scale(
            model.get_submodule(name), per_kv[:, None].expand(-1, repeats, -1).reshape(-1)
        )
        scale = per_kv.reshape(-1)
    producer.weight.mul_(scale.to(producer.weight).reshape(-1, 1))
    if producer.bias is not None:
        producer.bias.mul_(scale.to(producer.bias))
    wq = getattr(producer, "weight_quantizer", None)
    if isinstance(wq, TensorQuantizer) and wq.is_enabled:
        amax = wq.amax
        if wq.is_dynamic or amax is None or amax.numel() == 1 or (wq.block_sizes and wq.scale_bits):
            recalibrate_weight(producer)  # per-tensor / two-level scales: re-round the rows
        else:  # per-row scales take the factor exactly: same codes, scaled scales
            wq.amax = amax * scale.to(amax).reshape(-1, *[1] * (amax.dim() - 1))
    model.get_submodule(name).input_quantizer.pre_quant_scale = None
    return ROW_PRODUCERS[leaf]


def fold_pre_quant_scales(
    model: nn.Module, *, into_producers: bool = False, require: bool = False
) -> FoldReport:
    """Resmooth layers that share an input to one pre-quant scale and fold it where possible.

    ``into_producers`` also folds scales of layers without a preceding norm into the output rows
    of their :data:`ROW_PRODUCERS` sibling (not into ``v_proj`` when the V cache is quantized);
    ``require`` raises UnsupportedFormatError naming the layers whose scale stays. Changes ``model`` in place; returns what was done.
    """
    report = FoldReport()
    modules = dict(model.named_modules())
    if not any(_pqs(m) is not None for m in modules.values()):
        return report
    groups, producers = input_sources(model)
    with torch.no_grad():
        for first, names in groups.items():
            scales = [_pqs(modules[n]) for n in names]
            if all(s is None for s in scales):
                continue
            present = [s.float() for s in scales if s is not None]
            same = len(present) == len(scales) and all(torch.equal(s, present[0]) for s in present)
            shared = present[0] if same else torch.stack(present).mean(0)
            if not same:
                for n in names:
                    _set_input_scale(modules[n], shared)
                report.resmoothed.append(names)
            norm = producers.get(first)
            if norm is not None and _fold_into_norm(modules[norm], shared):
                for n in names:
                    modules[n].input_quantizer.pre_quant_scale = None
                report.into_norms[norm] = names
                continue
            if into_producers and len(names) == 1:
                sibling = _fold_into_rows(model, first, shared)
                if sibling is not None:
                    report.into_rows[first] = sibling
                    continue
            report.kept.extend(names)
    if require and report.kept:
        raise UnsupportedFormatError(
            f"pre-quant scales of {', '.join(report.kept)} cannot be folded (no preceding norm, no "
            "producer layer to take them, or a quantized V cache); the compressed-tensors layout "
            "has no pre_quant_scale: export with the modelopt layout or quantize without "
            "SmoothQuant/AWQ"
        )
    return report

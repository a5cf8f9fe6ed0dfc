"""Calibration ends deployable: the scales engines apply to fused GEMMs, shared in the model itself.

:func:`make_deployable` runs at the end of every :func:`quant_core.calibrate` (per decoder layer
under layer-by-layer calibration) and may be called again at any time; a second call changes
nothing. Over the input groups recorded during calibration (:mod:`quant_core.input_groups`) it

1. **resmooths** layers that read one tensor to one pre-quant scale ``s̄`` (their mean): each
   weight becomes ``W · s / s̄`` (max-recalibrated), a static per-tensor input amax becomes an upper
   bound of ``|x · s̄|`` derived from the old one (ModelOpt's export does the same);
2. **folds** ``s̄`` into the norm that produced the input (exact: its weight and bias times ``s̄``,
   checked on the norm itself), or, for a layer alone on its input, into the output rows of the
   sibling named in :data:`ROW_PRODUCERS` (``down_proj`` reads ``act(gate) · up``: ``up_proj``'s
   rows take the scale; ``o_proj`` reads attention over ``v_proj``'s output, per KV head; not into
   ``v_proj`` when the V cache is quantized). Producers with per-row weight scales take the factor
   exactly; per-tensor or two-level ones (FP8, NVFP4) are re-rounded. A scale that cannot be folded
   stays (layouts with a ``pre_quant_scale`` tensor write it; compressed-tensors refuses it);
3. **shares** across each group the largest static per-tensor input amax, per-tensor weight amax
   (FP8, the FP8 stage of W4A8) and NVFP4 global weight amax: vLLM, SGLang and TensorRT-LLM run
   q/k/v and gate/up as one GEMM with one such scale; across declared sibling sets (MoE experts)
   the input amax; across an attention's keys and values their per-tensor amax (TensorRT-LLM's one
   ``kv_cache_scaling_factor``);
4. **fits** W4A8 scales where TensorRT-LLM's W4A8_AWQ loader keeps them exactly (the FP8 stage's
   scale a power of two, each INT4 group scale an fp16 multiple of it).

The fake-quantized model then computes what every exported checkpoint holds, and exporters only
write. Measurements of what the sharing costs are in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.algorithms.weights import calibrate_weight
from quant_core.input_groups import InputGroup, input_groups
from quant_core.model_tools import quantizers_disabled
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = ["ROW_PRODUCERS", "DeployReport", "deployment_mismatches", "make_deployable"]

# Linear that reads a non-norm input -> sibling Linear whose output rows feed it linearly
# (llm-compressor keeps the same facts as data in its AWQ mappings).
ROW_PRODUCERS: dict[str, str] = {"down_proj": "up_proj", "o_proj": "v_proj", "w2": "w3"}


@dataclass
class DeployReport:
    """What :func:`make_deployable` changed: layer names per action."""

    resmoothed: list[tuple[str, ...]] = field(default_factory=list)
    into_norms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    into_rows: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    """Layers whose pre-quant scale could not be folded."""
    unsafe: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Folds undone because the probe's float outputs changed (norm or producer -> its layers)."""
    shared: list[tuple[str, ...]] = field(default_factory=list)
    kv_shared: list[str] = field(default_factory=list)
    fitted: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when the model changed."""
        return bool(
            self.resmoothed
            or self.into_norms
            or self.into_rows
            or self.shared
            or self.kv_shared
            or self.fitted
        )


def _pqs(module: nn.Module) -> torch.Tensor | None:
    iq = getattr(module, "input_quantizer", None)
    return iq.pre_quant_scale if isinstance(iq, TensorQuantizer) else None


def _set_input_scale(module: nn.Module, new: torch.Tensor) -> None:
    """Replace the layer's pre-quant scale by ``new`` keeping its function: W ← W · old / new."""
    iq = module.input_quantizer
    old = iq.pre_quant_scale
    old_f = torch.ones_like(module.weight[0], dtype=torch.float32) if old is None else old.float()
    new_f = new.float().to(old_f.device)
    ratio = old_f / new_f
    if torch.equal(ratio, torch.ones_like(ratio)):
        iq.pre_quant_scale = new_f
        return
    module.weight.mul_(ratio.to(module.weight.dtype))
    lora_a = getattr(module, "svdquant_lora_a", None)
    if isinstance(lora_a, torch.Tensor):  # SVDQuant's low-rank branch reads x · pre_quant_scale too
        lora_a.mul_(ratio.to(lora_a))
    if iq.is_enabled and not iq.is_dynamic and iq.amax is not None and iq.amax.numel() == 1:
        # |x · new| <= |x · old| · max(new / old): an upper bound of the new input amax
        iq.amax = iq.amax * (new_f / old_f).max()
    iq.pre_quant_scale = new_f
    wq = getattr(module, "weight_quantizer", None)
    if isinstance(wq, nn.Module) and getattr(wq, "is_enabled", False):
        calibrate_weight(module)


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
            calibrate_weight(producer)  # per-tensor / two-level scales: re-round the rows
        else:  # per-row scales take the factor exactly: same codes, scaled scales
            wq.amax = amax * scale.to(amax).reshape(-1, *[1] * (amax.dim() - 1))
    model.get_submodule(name).input_quantizer.pre_quant_scale = None
    return ROW_PRODUCERS[leaf]


def _resmooth(
    modules: dict[str, nn.Module], group: InputGroup, report: DeployReport
) -> Tensor | None:
    """Give the group's layers one pre-quant scale (their mean) and return it (None: no scale)."""
    names = group.members
    scales = [_pqs(modules[n]) for n in names]
    if all(s is None for s in scales):
        return None
    present = [s.float() for s in scales if s is not None]
    same = len(present) == len(scales) and all(torch.equal(s, present[0]) for s in present)
    shared = present[0] if same else torch.stack(present).mean(0)
    if not same:
        for n in names:
            _set_input_scale(modules[n], shared)
        report.resmoothed.append(names)
    return shared


def _fold(
    model: nn.Module, modules: dict[str, nn.Module], group: InputGroup, shared: Tensor
) -> str | None:
    """Fold the group's shared scale into its norm or (a lone layer) its row producer; the target."""
    if group.producer is not None and _fold_into_norm(modules[group.producer], shared):
        for n in group.members:
            modules[n].input_quantizer.pre_quant_scale = None
        return group.producer
    if len(group.members) == 1:
        return _fold_into_rows(model, group.members[0], shared)
    return None


def _snapshot(modules: list[nn.Module]) -> Callable[[], None]:
    """A function putting the parameters and quantizer scales of ``modules`` back as they are now."""
    params = [(p, p.detach().clone()) for m in modules for p in m.parameters()]
    quantizers = [
        (
            q,
            *(
                None if t is None else t.detach().clone()
                for t in (q.amax, q.pre_quant_scale, q.global_amax)
            ),
        )
        for m in modules
        for q in m.modules()
        if isinstance(q, TensorQuantizer)
    ]

    def undo() -> None:
        for p, value in params:
            p.copy_(value)
        for q, amax, pqs, global_amax in quantizers:
            q.amax, q.pre_quant_scale, q.global_amax = amax, pqs, global_amax

    return undo


def _touched(model: nn.Module, modules: dict[str, nn.Module], group: InputGroup) -> list[nn.Module]:
    """The modules a fold of ``group`` may change: its layers, its norm, a row producer."""
    touched = [modules[n] for n in group.members]
    if group.producer is not None:
        touched.append(modules[group.producer])
    parent, _, leaf = group.members[0].rpartition(".")
    sibling = getattr(modules.get(parent), ROW_PRODUCERS.get(leaf, ""), None)
    if isinstance(sibling, nn.Module):
        touched.append(sibling)
    return touched


def _scalar_static(q: object) -> bool:
    # Static per-tensor amax; NVFP4 quantizers with dynamic blocks keep their global amax here too.
    return (
        isinstance(q, TensorQuantizer)
        and q.is_enabled
        and q.amax is not None
        and q.amax.numel() == 1
        and q.lsq_state is None
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


def _nvfp4(q: object) -> bool:
    # four over six and LSQ keep their own scales (exporters refuse them by name)
    return (
        isinstance(q, TensorQuantizer)
        and q.is_enabled
        and q.format.has_global_amax
        and q.amax is not None
        and not q.format.four_over_six
        and q.lsq_state is None
    )


def global_amaxes(quantizers: list[object]) -> tuple[list[TensorQuantizer], list[torch.Tensor]]:
    """The enabled, calibrated NVFP4 quantizers in the list and the global amax each uses."""
    found = [q for q in quantizers if _nvfp4(q)]
    return found, [q.effective_global_amax(q.amax).reshape(()) for q in found]


def share_global_amax(quantizers: list[object]) -> bool:
    """Give the NVFP4 quantizers in the list their largest global amax; True when one changed.

    A dynamic quantizer's calibrated amax becomes the shared one; a static (per-block calibrated)
    one keeps its block amaxes and gets the shared ``TensorQuantizer.global_amax`` (its block
    scales are rounded to E4M3 under it). vLLM and SGLang apply the shards' ``max()``.
    """
    found, amaxes = global_amaxes(quantizers)
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


def last_weight_stage(module: nn.Module) -> object:
    """The weight quantizer whose per-tensor scale engines fuse (the last stage of a sequence)."""
    w = getattr(module, "weight_quantizer", None)
    return w[-1] if isinstance(w, SequentialQuantizer) else w


def _share_group(modules: dict[str, nn.Module], group: InputGroup) -> bool:
    members = [modules[n] for n in group.members]
    changed = share_amax([getattr(m, "input_quantizer", None) for m in members])
    if group.siblings:
        return changed
    stages = [last_weight_stage(m) for m in members]
    changed |= share_amax(stages)
    changed |= share_global_amax(stages)
    return changed


def _w4a8_stages(module: nn.Module) -> tuple[TensorQuantizer, TensorQuantizer] | None:
    """The calibrated (INT4, FP8) stages of a W4A8 weight quantizer, else None."""
    wq = getattr(module, "weight_quantizer", None)
    if not isinstance(wq, SequentialQuantizer) or len(wq) != 2 or not wq.is_enabled:
        return None
    int4, fp8 = wq
    if int4.amax is None or fp8.amax is None or fp8.amax.numel() != 1:
        return None
    return int4, fp8


def _fitted_w4a8(int4: TensorQuantizer, fp8: TensorQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(INT4 amax, FP8 amax) that TensorRT-LLM's W4A8_AWQ loader keeps exactly.

    The loader stores ``weights_scaling_factor / weights_scaling_factor_2`` in fp16
    (``modeling_utils.preprocess_perlayer_weights``), so the GEMM sees ``fp8(code * fp16(ratio))``
    times ``weights_scaling_factor_2``. The FP8 stage's scale is rounded up to a power of two and
    each INT4 group scale to ``fp16(ratio) x`` that scale: then every product is exact on both
    sides."""
    int4_max = int4.format.element.max_value
    fp8_max = fp8.format.element.max_value
    fp8_scale = torch.exp2(torch.ceil(torch.log2(fp8.amax.detach().float() / fp8_max)))
    ratio = int4.amax.detach().float() / int4_max / fp8_scale
    fitted = ratio.half().float() * fp8_scale * int4_max
    return fitted.to(int4.amax.dtype), (fp8_scale * fp8_max).to(fp8.amax.dtype)


def fit_w4a8_group_scales(module: nn.Module) -> bool:
    """Give a W4A8 layer the scales of :func:`_fitted_w4a8`; True when the model changed."""
    stages = _w4a8_stages(module)
    if stages is None:
        return False
    int4, fp8 = stages
    int4_amax, fp8_amax = _fitted_w4a8(int4, fp8)
    changed = not torch.equal(int4_amax, int4.amax) or not torch.equal(fp8_amax, fp8.amax)
    int4.amax, fp8.amax = int4_amax, fp8_amax
    return changed


def _kv_quantizers(module: nn.Module) -> list[object]:
    return [getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)]


def _outputs(value: Any) -> list[Tensor]:
    """The tensors in a forward's output (a tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(value, Tensor):
        return [value.detach().float().clone()]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


def _float_outputs(model: nn.Module, probe: Callable[[], Any]) -> list[Tensor]:
    """``probe()``'s outputs with every quantizer passing its input through (pre-quant scales stay):
    the float function that folding must not change."""
    with quantizers_disabled(model):
        return _outputs(probe())


def _same_function(before: list[Tensor], after: list[Tensor]) -> bool:
    """Equal up to float rounding (relative 1e-3 per output); a scaled residual is off by far more."""
    return len(before) == len(after) and all(
        a.shape == b.shape and (a - b).norm() <= 1e-3 * a.norm() + 1e-12
        for a, b in zip(before, after)
    )


def _dummy_probe(model: nn.Module) -> Callable[[], Any] | None:
    inputs = getattr(model, "dummy_inputs", None)
    params = list(model.parameters())
    if not isinstance(inputs, dict) or not params or any(p.is_meta for p in params):
        return None
    device = params[0].device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return lambda: model(**inputs)


def make_deployable(
    model: nn.Module, *, prefix: str = "", probe: Callable[[], Any] | None = None
) -> DeployReport:
    """Bring the model's quantizers into the state exporters write (see the module doc).

    Runs at the end of :func:`quant_core.calibrate`; call it yourself after changing scales by hand
    or on a model restored from a save made before input groups were recorded. ``prefix`` (a module
    name ending in a dot) limits it to the layers under that module. Every fold of a pre-quant
    scale is checked: ``probe()`` (default: the model on its ``dummy_inputs``; calibration passes
    one calibration batch) must compute the same float function after it, else the fold is undone
    and the scale kept (a norm whose output also feeds a residual, say). Without any probe no scale
    is folded. Returns what changed.
    """
    report = DeployReport()
    modules = dict(model.named_modules())
    groups = input_groups(model, prefix=prefix, siblings=True)
    grouped = {n for g in groups for n in g.members}
    loose = [
        InputGroup((n,))
        for n, m in modules.items()
        if n.startswith(prefix) and n not in grouped and _pqs(m) is not None
    ]
    probe = probe or _dummy_probe(model)
    with torch.no_grad():
        scaled = [
            (g, shared)
            for g in [*groups, *loose]
            if not g.siblings and (shared := _resmooth(modules, g, report)) is not None
        ]
        _fold_all(model, modules, scaled, probe, report)
        for group in groups:  # after the folds: folding into rows re-rounds other groups' weights
            if len(group.members) > 1 and _share_group(modules, group):
                report.shared.append(group.members)
        for name, module in modules.items():
            if not name.startswith(prefix):
                continue
            if share_amax(_kv_quantizers(module)):
                report.kv_shared.append(name)
            if fit_w4a8_group_scales(module):
                report.fitted.append(name)
    return report


def _fold_all(
    model: nn.Module,
    modules: dict[str, nn.Module],
    scaled: list[tuple[InputGroup, Tensor]],
    probe: Callable[[], Any] | None,
    report: DeployReport,
) -> None:
    """Fold every group's scale, checked against ``probe``: all at once, and one by one if that
    changed the function (keeping the folds that do not)."""
    if not scaled:
        return
    if probe is None:
        report.kept.extend(n for g, _s in scaled for n in g.members)
        return
    before = _float_outputs(model, probe)
    undos = [_snapshot(_touched(model, modules, g)) for g, _s in scaled]
    targets = [_fold(model, modules, g, shared) for g, shared in scaled]
    if not _same_function(before, _float_outputs(model, probe)):
        for undo in reversed(undos):
            undo()
        targets = []
        for g, shared in scaled:
            undo = _snapshot(_touched(model, modules, g))
            target = _fold(model, modules, g, shared)
            if target is not None and not _same_function(before, _float_outputs(model, probe)):
                undo()
                report.unsafe[target] = g.members
                target = None
            targets.append(target)
    for (g, _s), target in zip(scaled, targets):
        if target is None:
            report.kept.extend(g.members)
        elif target == g.producer:
            report.into_norms[target] = g.members
        else:
            report.into_rows[g.members[0]] = target


def _differ(values: list[torch.Tensor]) -> bool:
    return any(not torch.equal(v, values[0]) for v in values[1:])


def _scalars(quantizers: list[object]) -> list[torch.Tensor]:
    return [q.amax.detach().float().reshape(()) for q in quantizers if _scalar_static(q)]


def deployment_mismatches(model: nn.Module, *, prefix: str = "") -> list[str]:
    """What :func:`make_deployable` would still change, one line per layer group (read only).

    Exporters refuse a model for which this is not empty: its files would hold scales that
    engines apply differently from the fake-quantized model (or change the model to match).
    ``prefix`` (a module name ending in a dot) limits it to the layers under that module."""
    problems: list[str] = []
    modules = {n: m for n, m in model.named_modules() if n.startswith(prefix)}
    for group in input_groups(model, prefix=prefix, siblings=True):
        members = [modules[n] for n in group.members]
        names = ", ".join(group.members)
        scales = [_pqs(m) for m in members]
        present = [s.float() for s in scales if s is not None]
        if present and (len(present) != len(scales) or _differ(present)):
            problems.append(f"{names}: different pre_quant_scales on one input")
        if len(members) < 2:
            continue
        inputs = _scalars([getattr(m, "input_quantizer", None) for m in members])
        if inputs and _differ(inputs):
            problems.append(f"{names}: different input amaxes on one input")
        if group.siblings:
            continue
        stages = [last_weight_stage(m) for m in members]
        weights = _scalars(stages)
        if weights and _differ(weights):
            problems.append(f"{names}: different per-tensor weight amaxes in one fused GEMM")
        _, amaxes = global_amaxes(stages)
        if amaxes and _differ(amaxes):
            problems.append(f"{names}: different NVFP4 global weight amaxes in one fused GEMM")
    for name, module in modules.items():
        kv = _scalars(_kv_quantizers(module))
        if len(kv) == 2 and _differ(kv):
            problems.append(f"{name}: different key and value cache amaxes")
        if _w4a8_unfitted(module):
            problems.append(f"{name}: W4A8 scales not fitted to TensorRT-LLM's fp16 ratio")
    return problems


def _w4a8_unfitted(module: nn.Module) -> bool:
    stages = _w4a8_stages(module)
    if stages is None:
        return False
    int4_amax, fp8_amax = _fitted_w4a8(*stages)
    return not torch.equal(int4_amax, stages[0].amax) or not torch.equal(fp8_amax, stages[1].amax)

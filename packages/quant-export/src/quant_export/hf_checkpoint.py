"""``export_hf_checkpoint``: a quant-core quantized Hugging Face model to a unified HF checkpoint.

The directory holds ``config.json`` (with a ``quantization_config`` block, ``quant_method``
``"modelopt"``), ``hf_quant_config.json`` (ModelOpt's ``{"producer", "quantization"}`` form),
``generation_config.json`` when the model has one, and ``model.safetensors`` (or shards plus
``model.safetensors.index.json``). Tensor names are the model's own; quantized layers carry the
codes and scales of :mod:`quant_export.hf_formats`, attention modules their KV-cache ``k_scale`` /
``v_scale``. This is the layout vLLM (``quantization="modelopt"`` / ``"modelopt_fp4"``),
SGLang and TensorRT-LLM's PyTorch backend read. Every quantizer is checked before anything is
written, and files are written through temporary names and ``os.replace``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export._version import __version__
from quant_export.checkpoint_files import (
    DEFAULT_SHARD_SIZE,
    PartWriter,
    Scope,
    check_weight_stored,
    checkpoint_texts,
    plain_tensors,
    scoped,
)
from quant_export.deployable_check import check_deployable
from quant_export.engines import LOADERS, loaders_for
from quant_export.hf_formats import (
    KV_QUANTIZERS,
    Kind,
    LayerExport,
    export_kv_scales,
    export_linear,
)
from quant_export.quantizers import UnsupportedFormatError
from quant_export.schemes import config_groups, scheme_of


def _changes_input(quantizer: nn.Module) -> bool:
    if isinstance(quantizer, SequentialQuantizer):
        return quantizer.is_enabled
    return quantizer.is_enabled or quantizer.pre_quant_scale is not None


class _Collected:
    """Tensors, per-layer formats and exclusions gathered from one model."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, LayerExport] = {}
        self.excluded: list[str] = []
        self.kv_algos: set[str] = set()
        self.consumed: set[str] = set()


def _linear(
    name: str,
    module: nn.Linear,
    state: dict[str, torch.Tensor],
    out: _Collected,
    replaced: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Record one Linear: its codes and scales, or (unquantized) its exclusion and folded scales."""
    layer = export_linear(name, module)
    if layer is not None:
        check_weight_stored(name, module, state)
        if layer.quant_algo == "W4A16_AWQ" and "pre_quant_scale" not in layer.tensors:
            # TensorRT-LLM's unfused W4A16_AWQ loader reads pre_quant_scale unconditionally
            # (tensorrt_llm/_torch/modules/linear.py, W4A16_AWQ_LinearMethod.load_weights_vanilla)
            layer.tensors["pre_quant_scale"] = torch.ones(module.weight.shape[-1])
        out.layers[name] = layer
        replaced[name] = layer.tensors
        out.consumed.update(layer.quantizers)
        return
    out.excluded.append(name)
    out.consumed.add(f"{name}.weight_quantizer")
    iq = getattr(module, "input_quantizer", None)
    scales = [getattr(module.weight_quantizer, "pre_quant_scale", None)]
    if isinstance(iq, TensorQuantizer):
        scales.append(iq.pre_quant_scale)
        out.consumed.add(f"{name}.input_quantizer")
    scales = [s for s in scales if s is not None]
    if scales:
        # An unquantized layer's pre-quant scales fold exactly: (x * s) W^T = x (W * s)^T.
        check_weight_stored(name, module, state)
        folded = module.weight.detach().float()
        for s in scales:
            folded = folded * s.float()
        replaced[name] = {"weight": folded}


def collect_hf(model: nn.Module, dtype: torch.dtype, scope: Scope = None) -> _Collected:
    """Gather every tensor of the modules ``scope`` selects (all by default) and their formats;
    raises UnsupportedFormatError before anything is written."""
    state, quantizers, modules = scoped(model, scope)
    out = _Collected()
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in tqdm(modules, desc="export hf", leave=False):
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(module, nn.Linear) and isinstance(wq, TensorQuantizer | SequentialQuantizer):
            _linear(name, module, state, out, replaced)
        if all(isinstance(getattr(module, q, None), TensorQuantizer) for q in KV_QUANTIZERS):
            algo, kv = export_kv_scales(name, module)
            out.consumed.update(f"{name}.{q}" for q in ("q_bmm_quantizer", *KV_QUANTIZERS))
            if algo is not None:
                out.kv_algos.add(algo)
                out.tensors.update(kv)
    for qname, quantizer in quantizers.items():
        if qname not in out.consumed and _changes_input(quantizer):
            raise UnsupportedFormatError(
                f"quantizer {qname} ({type(quantizer).__name__}: {quantizer.extra_repr()}) has no "
                "form in the Hugging Face checkpoint (only Linear weight/input quantizers and "
                "k/v_bmm_quantizers are exported)"
            )
    if len(out.kv_algos) > 1:
        raise UnsupportedFormatError(
            f"KV-cache formats differ across layers: {sorted(out.kv_algos)}"
        )
    out.tensors.update(plain_tensors(state, quantizers, replaced, set(out.layers), dtype))
    return out


def _quant_summary(parts: list[_Collected]) -> dict[str, Any]:
    """ModelOpt's ``quantization`` block: one quant_algo, or MIXED_PRECISION with per-layer entries."""
    layers = {name: layer for part in parts for name, layer in part.layers.items()}
    kv_algos = {algo for part in parts for algo in part.kv_algos}
    if len(kv_algos) > 1:
        raise UnsupportedFormatError(f"KV-cache formats differ across layers: {sorted(kv_algos)}")
    configs = {name: layer.layer_config() for name, layer in layers.items()}
    distinct = {json.dumps(c, sort_keys=True) for c in configs.values()}
    kv_algo = next(iter(kv_algos), None)
    summary: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    if len(distinct) == 1:
        summary.update(json.loads(distinct.pop()))
    elif distinct:
        summary["quant_algo"] = "MIXED_PRECISION"
        summary["quantized_layers"] = configs
    summary["exclude_modules"] = sorted(n for part in parts for n in part.excluded)
    schemes = {
        name: scheme_of(layer.kinds, layer.group_size, layer.quant_algo)
        for name, layer in layers.items()
    }
    if schemes:  # ModelOpt writes this too; vLLM reads it to tell W4A16 NVFP4 from W4A4
        groups, _ = config_groups(schemes)
        summary["config_groups"] = {
            k: {f: v for f, v in g.items() if f != "format"} for k, g in groups.items()
        }
    return summary


def quantization_config(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``.

    It carries ModelOpt's keys (``quant_algo``, ``kv_cache_quant_algo``, ``group_size``,
    ``exclude_modules``) and the compressed-tensors style keys vLLM reads from ``config.json``
    (``ignore``, ``kv_cache_scheme``), with ``quant_method`` ``"modelopt"``.
    """
    qc = {"quant_method": "modelopt", **summary}
    qc["ignore"] = list(summary["exclude_modules"])
    kv = summary["kv_cache_quant_algo"]
    if kv == "FP8":
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif kv == "INT8":
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "int"}
    elif kv is not None:
        qc["kv_cache_scheme"] = kv
    qc["producer"] = {"name": "quant-export", "version": __version__}
    return qc


def export_hf_checkpoint(
    model: nn.Module,
    export_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    share_fused_scales: bool = True,
    engine: str | None = None,
) -> Path:
    """Write a quantized transformers model as a unified Hugging Face checkpoint in ``export_dir``.

    ``dtype`` (bfloat16, float16 or float32) is the type of every tensor left unquantized; scales
    stay float32 (NVFP4 block scales float8_e4m3fn). The model is only read: calibration already
    shared the scales of fused layers and folded pre-quant scales where it could
    (:func:`quant_core.make_deployable`); pre-quant scales that remain are written as
    ``pre_quant_scale``. A model whose fused layers (q/k/v, gate/up) disagree is refused, or with
    ``share_fused_scales=False`` written with a warning. ``engine`` (a key of
    :data:`quant_export.engines.LOADERS`) requires that engine to load the result; by default at
    least one must. Raises UnsupportedFormatError, naming the layer and quantizer, for any active
    quantizer without a checkpoint form, or naming the engines for a format none loads.
    """
    check_deployable(model, share_fused_scales=share_fused_scales)
    if engine is not None and engine not in LOADERS:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(LOADERS)}")
    return STREAMED.write(model, export_dir, dtype, max_shard_size, engine=engine)


def hf_texts(
    model: nn.Module, parts: list[_Collected], dtype: torch.dtype, engine: str | None = None
) -> dict[str, str]:
    """config.json, hf_quant_config.json and generation_config.json of the checkpoint made of
    ``parts``; raises UnsupportedFormatError naming the engines for a format none loads."""
    summary = _quant_summary(parts)
    if summary["quant_algo"] is None and summary["kv_cache_quant_algo"] is None:
        warnings.warn(
            f"{type(model).__name__} has no quantized layer or KV cache; writing a plain checkpoint "
            "with quant_algo null",
            UserWarning,
            stacklevel=3,
        )
    algos = {layer.quant_algo for part in parts for layer in part.layers.values()}
    if algos or summary["kv_cache_quant_algo"]:
        loaders = loaders_for(algos, summary["kv_cache_quant_algo"], engine)
    else:
        loaders = list(LOADERS)
    producer = {"name": "quant-export", "version": __version__}
    extra = {
        "hf_quant_config.json": json.dumps(
            {"producer": producer, "quantization": summary, "loaders": loaders}, indent=4
        )
    }
    return checkpoint_texts(model, quantization_config(summary), dtype, extra)


def export_layout(
    model: nn.Module, out: Path, dtype: torch.dtype, _sample: Any, _args: Any
) -> Path:
    """The ``modelopt`` row's writer (:mod:`quant_export.layouts`): :func:`export_hf_checkpoint`."""
    return export_hf_checkpoint(model, out, dtype=dtype)


def _part(model: nn.Module, dtype: torch.dtype, scope: Scope) -> tuple[dict, Any]:
    collected = collect_hf(model, dtype, scope)
    tensors, collected.tensors = collected.tensors, {}
    for layer in collected.layers.values():  # the config reads which tensors a layer has
        layer.tensors = {k: torch.empty(0) for k in layer.tensors}
    return tensors, collected


def _part_to_json(part: _Collected) -> dict[str, Any]:
    layers = {
        n: {
            "quant_algo": x.quant_algo, "group_size": x.group_size, "tensors": list(x.tensors),
            "quantizers": list(x.quantizers), "kinds": [k.value for k in x.kinds],
        }
        for n, x in part.layers.items()
    }  # fmt: skip
    return {"layers": layers, "excluded": part.excluded, "kv_algos": sorted(part.kv_algos)}


def _part_from_json(value: dict[str, Any]) -> _Collected:
    part = _Collected()
    for name, x in value["layers"].items():
        part.layers[name] = LayerExport(
            x["quant_algo"], x["group_size"], {k: torch.empty(0) for k in x["tensors"]},
            tuple(x["quantizers"]), (Kind(x["kinds"][0]), Kind(x["kinds"][1])),
        )  # fmt: skip
    part.excluded = list(value["excluded"])
    part.kv_algos = set(value["kv_algos"])
    return part


STREAMED = PartWriter(_part, hf_texts, True, _part_to_json, _part_from_json)
"""How :class:`quant_export.streamed_checkpoint.StreamedCheckpoint` writes this layout part by part."""

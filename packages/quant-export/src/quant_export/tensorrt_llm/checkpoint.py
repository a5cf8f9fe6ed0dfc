"""``export_tensorrt_llm_checkpoint``: a quantized transformers model as a TensorRT-LLM checkpoint.

The directory holds ``config.json`` (TensorRT-LLM's ``PretrainedConfig``, :mod:`.config`), one
``rank{r}.safetensors`` per tensor-parallel rank with TensorRT-LLM's tensor names
(:mod:`.families`, :mod:`.formats`, :mod:`.split`, :mod:`.experts`) and, for a model mixing
formats, ``quant_cfg.json`` (``quant_algo`` ``MIXED_PRECISION`` with ``quantized_layers``, read by
``PretrainedConfig.from_json_file`` in ``tensorrt_llm/models/modeling_utils.py``). This is what
``trtllm-build --checkpoint_dir`` reads (the layout of ModelOpt's
``modelopt/torch/export/model_config_export.py`` ``export_tensorrt_llm_checkpoint``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.checkpoint_files import DTYPES, check_export_dir, write_atomically
from quant_export.deployable_check import check_deployable
from quant_export.hf_formats import KV_QUANTIZERS, export_kv_scales
from quant_export.quantizers import UnsupportedFormatError
from quant_export.tensorrt_llm import smoothquant_plugin as smoothquant_plugin_layout
from quant_export.tensorrt_llm.config import check_parallel, pretrained_config
from quant_export.tensorrt_llm.experts import export_experts, split_experts
from quant_export.tensorrt_llm.families import COLUMN, Family, LinearMap, family_of
from quant_export.tensorrt_llm.formats import TrtLinear, export_trt_linear
from quant_export.tensorrt_llm.split import (
    head_parts,
    split_linear,
    split_pipeline,
    split_rows,
)
from quant_export.tensorrt_llm.validate import validate_tensorrt_llm_checkpoint

KV_ALGOS = ("FP8", "INT8")  # KV-cache formats written here (TensorRT-LLM also has NVFP4)
LM_HEAD = LinearMap("lm_head", ("lm_head",), COLUMN)
_LINEAR_QUANTIZERS = ("weight_quantizer", "input_quantizer")


@dataclass
class _Collected:
    """Everything the rank files hold, before splitting."""

    linears: dict[str, tuple[LinearMap, list[TrtLinear]]] = field(default_factory=dict)
    experts: dict[str, dict[str, TrtLinear]] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # split along rows
    replicated: dict[str, torch.Tensor] = field(default_factory=dict)
    kv_algos: set[str] = field(default_factory=set)
    handled: set[str] = field(default_factory=set)  # quantizer names with a form in the files


def _layers(model: nn.Module, family: Family) -> list[nn.Module]:
    modules = dict(model.named_modules())
    if family.layers not in modules:
        raise ValueError(
            f"{type(model).__name__} has no {family.layers!r}: not a {family.architecture} model"
        )
    return list(modules[family.layers])


def _check_fused(name: str, parts: list[TrtLinear]) -> None:
    """Parts of one TensorRT-LLM layer must share format and every per-tensor / input-side scale."""
    formats = {(p.quant_algo, p.group_size) for p in parts}
    if len(formats) > 1:
        raise UnsupportedFormatError(
            f"layer {name}: its parts use different formats {sorted(map(str, formats))}; "
            "TensorRT-LLM runs them as one GEMM with one format"
        )
    for leaf, t in parts[0].tensors.items():
        shared = (t.numel() == 1 and leaf != "weight") or leaf == "prequant_scaling_factor"
        if shared and any(not torch.equal(p.tensors[leaf], t) for p in parts[1:]):
            raise UnsupportedFormatError(f"layer {name}: parts differ in {leaf}")


def _linear(
    prefix: str, lm: LinearMap, sub: dict[str, nn.Module], hf_prefix: str, dtype, out: _Collected
) -> None:
    name = f"{prefix}{lm.trt}" if prefix else lm.trt
    parts = [export_trt_linear(f"{hf_prefix}{n} ({name})", sub[n], dtype) for n in lm.hf]
    parts = head_parts(parts, lm.heads)
    _check_fused(name, parts)
    out.linears[name] = (lm, parts)


def _norm(name: str, module: nn.Module, dtype: torch.dtype, out: _Collected) -> None:
    for leaf in ("weight", "bias"):
        value = getattr(module, leaf, None)
        if value is not None:
            out.replicated[f"{name}.{leaf}"] = value.detach().to(dtype)


def _kv(name: str, attention: nn.Module, out: _Collected) -> None:
    if not all(isinstance(getattr(attention, q, None), TensorQuantizer) for q in KV_QUANTIZERS):
        return
    algo, tensors = export_kv_scales(name, attention)
    if algo is None:
        return
    if algo not in KV_ALGOS or any(k.endswith("_bias") for k in tensors):
        raise UnsupportedFormatError(
            f"attention {name}: KV cache {algo}{' affine' if len(tensors) > 2 else ''} is not "
            f"written to TensorRT-LLM checkpoints here; use one of {list(KV_ALGOS)}"
        )
    scale = torch.stack([t.reshape(()) for t in tensors.values()]).max()
    out.replicated[f"{name}.kv_cache_scaling_factor"] = scale.reshape(1).float()
    out.kv_algos.add(algo)


def _handle_layer(i: int, layer: nn.Module, layer_name: str, family: Family, dtype, out) -> None:
    prefix = f"transformer.layers.{i}."
    sub = dict(layer.named_modules())
    for hf, trt in family.norms.items():
        _norm(prefix + trt, sub[hf], dtype, out)
    for lm in family.linears:
        _linear(prefix, lm, sub, f"{layer_name}.", dtype, out)
        out.handled.update(f"{layer_name}.{n}.{q}" for n in lm.hf for q in _LINEAR_QUANTIZERS)
    _kv(prefix + "attention", sub[family.attention], out)
    out.handled.update(f"{layer_name}.{family.attention}.{q}" for q in KV_QUANTIZERS)
    if family.moe:
        out.experts[prefix + "mlp"] = export_experts(
            f"{layer_name}.{family.moe}", sub[family.moe], dtype
        )
        out.handled.update(  # each expert's quantizers, under ModelOpt's names
            f"{layer_name}.{family.moe}.{p.param_name}_{q}s.{p.index}"
            for w in ("up_proj", "down_proj")
            for p in getattr(sub[family.moe], f"quant_{w}", [])
            for q in _LINEAR_QUANTIZERS
        )
        router = sub[family.router].weight.detach().float()  # TensorRT-LLM's router is float32
        out.replicated[prefix + "mlp.router.weight"] = router


def _check_handled(model: nn.Module, out: _Collected) -> None:
    """Every quantizer that changes the model must have a form in the checkpoint."""
    for name, q in model.named_modules():
        if isinstance(q, SequentialQuantizer):
            active = q.is_enabled
        elif isinstance(q, TensorQuantizer):
            active = q.is_enabled or q.pre_quant_scale is not None
        else:
            continue
        if active and name not in out.handled and name.rpartition(".")[0] not in out.handled:
            raise UnsupportedFormatError(
                f"quantizer {name} ({q.extra_repr()}) has no form in a TensorRT-LLM checkpoint "
                "(only linear weight/input quantizers and the k/v_bmm_quantizers are written)"
            )


def _collect(model: nn.Module, family: Family, dtype: torch.dtype) -> _Collected:
    modules = dict(model.named_modules())
    out = _Collected()
    out.rows["transformer.vocab_embedding.weight"] = (
        modules[family.embedding].weight.detach().to(dtype)
    )
    if family.position_embedding:
        weight = modules[family.position_embedding].weight.detach().to(dtype)
        out.rows["transformer.position_embedding.weight"] = weight
    layers = _layers(model, family)
    for i, layer in enumerate(tqdm(layers, desc="export trtllm", leave=False)):
        _handle_layer(i, layer, f"{family.layers}.{i}", family, dtype, out)
    _norm("transformer.ln_f", modules[family.final_norm], dtype, out)
    _linear("", LM_HEAD, modules, "", dtype, out)
    out.handled.update(f"lm_head.{q}" for q in _LINEAR_QUANTIZERS)
    _check_handled(model, out)
    if len(out.kv_algos) > 1:
        raise UnsupportedFormatError(
            f"KV-cache formats differ across layers: {sorted(out.kv_algos)}"
        )
    return out


def _quantization(out: _Collected) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json ``quantization``, quant_cfg.json or None), as ModelOpt's ``process_layer_quant_config``."""
    layers: dict[str, dict[str, Any]] = {}
    excluded: list[str] = []
    for name, (_, parts) in out.linears.items():
        if parts[0].quant_algo is None:
            excluded.append(name)
        else:
            layers[name] = parts[0].layer_config()
    for prefix, projections in out.experts.items():
        for trt, layer in projections.items():
            if layer.quant_algo is None:
                excluded.append(f"{prefix}.{trt}")
            else:
                layers[f"{prefix}.{trt}"] = layer.layer_config()
    excluded += [n.rpartition(".")[0] for n in out.replicated if n.endswith("mlp.router.weight")]
    excluded += [n.rpartition(".")[0] for n in out.rows]
    kv = next(iter(out.kv_algos), None)
    distinct = {json.dumps(c, sort_keys=True) for c in layers.values()}
    if len(distinct) > 1:
        mixed = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": kv}
        return mixed, {**mixed, "quantized_layers": layers}
    single = json.loads(distinct.pop()) if distinct else {"quant_algo": None}
    quantization = {
        "quant_algo": single["quant_algo"],
        "kv_cache_quant_algo": kv,
        "group_size": single.get("group_size", 128),
        "has_zero_point": False,
        "pre_quant_scale": single.get("pre_quant_scale", False),
        # "name*": TensorRT-LLM matches exclusions against module names (quantize_layers) and,
        # for W8A16's load-time quantization, against weight names (weight_only_quantize_dict)
        "exclude_modules": sorted({f"{n}*" for n in excluded}) if single["quant_algo"] else None,
    }
    return quantization, None


def _rank_tensors(out: _Collected, tp: int) -> list[dict[str, torch.Tensor]]:
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def add(pieces: list[dict[str, torch.Tensor]]) -> None:
        for rank, piece in zip(ranks, pieces):
            rank.update(piece)

    for name, t in out.rows.items():
        add(split_rows(name, t, tp))
    for name, (lm, parts) in out.linears.items():
        add(split_linear(name, parts, lm.parallel, tp))
    for prefix, projections in out.experts.items():
        add(split_experts(prefix, projections, tp))
    for rank in ranks:
        rank.update(out.replicated)
        seen: set[int] = set()
        for key, value in rank.items():  # safetensors stores no aliases (tied lm_head, fp32 views)
            value = value.contiguous()
            rank[key] = value.clone() if value.data_ptr() in seen else value
            seen.add(value.data_ptr())
    return ranks


def _biases(out: _Collected) -> dict[str, bool]:
    def has(suffix: str) -> bool:
        return any(
            n.endswith(suffix) and "bias" in p[0].tensors for n, (_, p) in out.linears.items()
        )

    return {"attn": has("attention.qkv"), "mlp": has("mlp.fc")}


def export_tensorrt_llm_checkpoint(
    model: nn.Module,
    decoder_type: str,
    dtype: torch.dtype = torch.float16,
    export_dir: str | os.PathLike[str] = "tensorrt_llm_checkpoint",
    inference_tensor_parallel: int = 1,
    inference_pipeline_parallel: int = 1,
    *,
    smoothquant_plugin: bool = False,
) -> Path:
    """Write a quantized transformers model as a TensorRT-LLM checkpoint (``trtllm-build`` input).

    ``decoder_type`` is ModelOpt's name for the family (``llama`` for Llama / Mistral / Qwen2 /
    Qwen3 / Mixtral, ``qwen``, ``mistral``, ``mixtral``, ``gpt``/``gpt2``). Layers that
    TensorRT-LLM fuses (q/k/v, experts, keys and values) first get shared scales in the model
    itself, as ModelOpt's export does, so the model keeps computing what the files hold.
    ``smoothquant_plugin`` writes an INT8 SmoothQuant model in TensorRT-LLM's plugin layout
    (``W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN``: smoothing folded into the norms, ``smoother``,
    ``scale_to_int``) instead of the ModelOpt flow's ``W8A8_SQ_PER_CHANNEL``.
    ``inference_tensor_parallel`` x ``inference_pipeline_parallel`` rank files are written (rank
    ``p * tp + t``). Raises ValueError (architecture, parallel sizes) or UnsupportedFormatError (a format
    TensorRT-LLM cannot hold) before anything is written. Returns the directory.
    """
    check_deployable(model)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES.values())}, got {dtype}")
    hf = getattr(model, "config", None)
    if hf is None or not hasattr(hf, "model_type"):
        raise TypeError(
            f"a transformers model with a .config is needed, got {type(model).__name__}"
        )
    family = family_of(hf.model_type, decoder_type)
    tp, pp = inference_tensor_parallel, inference_pipeline_parallel
    check_parallel(hf, tp, pp)
    export_dir = check_export_dir(export_dir)
    with torch.no_grad():
        collected = _collect(model, family, dtype)
        if smoothquant_plugin:
            if collected.experts:
                raise UnsupportedFormatError(
                    f"smoothquant_plugin: {family.architecture} has MoE layers; "
                    f"{smoothquant_plugin_layout.PLUGIN_ALGO} covers dense models"
                )
            smoothquant_plugin_layout.convert(collected.linears, collected.replicated, dtype)
    quantization, quant_cfg = _quantization(collected)
    config = pretrained_config(hf, family, DTYPES[dtype], tp, pp, quantization, _biases(collected))
    ranks = split_pipeline(_rank_tensors(collected, tp), pp, config["num_hidden_layers"])
    if smoothquant_plugin:
        smoothquant_plugin_layout.shape_ranks(ranks)

    def write(folder: Path) -> list[str]:
        texts = {"config.json": config}
        if quant_cfg is not None:
            texts["quant_cfg.json"] = quant_cfg
        for fname, value in texts.items():
            (folder / fname).write_text(json.dumps(value, indent=4), encoding="utf-8")
        names = [f"rank{r}.safetensors" for r in range(tp * pp)]
        for fname, tensors in zip(names, tqdm(ranks, desc="export trtllm: ranks", leave=False)):
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        validate_tensorrt_llm_checkpoint(folder)
        return [*texts, *names]

    return write_atomically(export_dir, write, stale=("rank*.safetensors", "quant_cfg.json"))


def export_layout(model: nn.Module, out: Path, dtype: torch.dtype, _sample: Any, args: Any) -> Path:
    """The ``trtllm`` row's writer (:mod:`quant_export.layouts`): the decoder type from the model's
    ``model_type``, ``args.tp`` x ``args.pp`` ranks."""
    from quant_export.tensorrt_llm.families import DECODER_TYPES

    model_type = model.config.model_type
    decoder = next((d for d, types in DECODER_TYPES.items() if model_type in types), None)
    if decoder is None:
        raise SystemExit(
            f"--format trtllm: no TensorRT-LLM decoder type covers {model_type!r} (covered: "
            f"{', '.join(sorted({t for types in DECODER_TYPES.values() for t in types}))})"
        )
    return export_tensorrt_llm_checkpoint(
        model, decoder, dtype, out, inference_tensor_parallel=args.tp,
        inference_pipeline_parallel=args.pp,
    )  # fmt: skip

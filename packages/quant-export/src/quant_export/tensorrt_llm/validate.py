"""``validate_tensorrt_llm_checkpoint``: check a TensorRT-LLM checkpoint folder without TensorRT-LLM.

It checks what ``PretrainedModel.from_checkpoint`` / ``preprocess_weights`` and the layer classes
(``tensorrt_llm/models/modeling_utils.py``, ``tensorrt_llm/quantization/layers.py``,
``tensorrt_llm/layers/moe.py``) rely on: ``config.json`` keys and ``mapping``, a known
``quant_algo`` (``tensorrt_llm/quantization/mode.py`` ``QuantAlgo``), ``quant_cfg.json`` for
``MIXED_PRECISION``, one ``rank{r}.safetensors`` per rank, and in each rank every tensor a layer
needs, with the dtype its format stores and the shape its tensor-parallel slice has. Of the
tensors' values, only the scale tensors are read (finite, per-tensor ones positive).
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open

from quant_export.tensorrt_llm.families import FAMILIES

# tensorrt_llm/quantization/mode.py QuantAlgo (the members a checkpoint can name)
QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ",
    "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8",
    "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}  # fmt: skip
KV_CACHE_ALGOS = {"FP8", "INT8", "NVFP4"}
REQUIRED_KEYS = (
    "architecture", "dtype", "logits_dtype", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_size", "intermediate_size", "head_size", "vocab_size",
    "max_position_embeddings", "hidden_act", "norm_epsilon", "position_embedding_type",
    "use_parallel_embedding", "embedding_sharding_dim", "mapping", "quantization",
)  # fmt: skip
_FLOAT = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# quant_algo -> (safetensors dtype of the weight or None for the model dtype, scale leaves,
# packing: (rows, cols) divisors of the logical (out, in) weight)
LAYOUTS: dict[str | None, tuple[str | None, tuple[str, ...], tuple[int, int]]] = {
    None: (None, (), (1, 1)),
    "W8A16": (None, (), (1, 1)),
    "FP8": ("F8_E4M3", ("weights_scaling_factor", "activation_scaling_factor"), (1, 1)),
    "FP8_PER_CHANNEL_PER_TOKEN": ("F8_E4M3", ("per_channel_scale",), (1, 1)),
    "W8A8_SQ_PER_CHANNEL": (
        "I8",
        ("weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor"),
        (1, 1),
    ),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": ("I8", ("per_channel_scale", "act_scale"), (1, 1)),
    "W4A16_AWQ": ("I8", ("weights_scaling_factor",), (2, 1)),
    "W4A8_AWQ": (
        "I8",
        (
            "weights_scaling_factor",
            "weights_scaling_factor_2",
            "activation_scaling_factor",
            "prequant_scaling_factor",
        ),
        (2, 1),
    ),
    "NVFP4": (
        "U8",
        ("weights_scaling_factor", "weights_scaling_factor_2", "activation_scaling_factor"),
        (1, 2),
    ),
}


def _load_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{path.name}: {err}")
        return None


def _layer_algo(name: str, quant: dict[str, Any], layers: dict[str, Any] | None) -> str | None:
    if layers is not None:
        return next(
            (c["quant_algo"] for n, c in layers.items() if fnmatch.fnmatchcase(name, n)), None
        )
    excluded = quant.get("exclude_modules") or []
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded):
        return None
    return quant.get("quant_algo")


def _linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Linear name in a layer -> (logical out, logical in, split axis) of one rank."""
    tp = cfg["mapping"]["tp_size"]
    h, hs, inter = cfg["hidden_size"], cfg["head_size"], cfg["intermediate_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hs
    shapes = {
        "attention.qkv": (qkv // tp, h, 0),
        "attention.dense": (h, cfg["num_attention_heads"] * hs // tp, 1),
    }
    if (cfg.get("moe") or {}).get("num_experts"):
        return shapes
    shapes.update({"mlp.fc": (inter // tp, h, 0), "mlp.proj": (h, inter // tp, 1)})
    if cfg["architecture"] != "GPTForCausalLM":
        shapes["mlp.gate"] = (inter // tp, h, 0)
    return shapes


def _check_rank(
    path: Path, stage: int, cfg: dict[str, Any], layers: dict | None, problems: list[str]
) -> None:
    quant = cfg["quantization"]
    with safe_open(str(path), framework="pt") as f:
        found = {
            k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
            for k in f.keys()  # noqa: SIM118 (safe_open is not iterable)
        }

    def need(name: str, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> None:
        if name not in found:
            problems.append(f"{path.name}: missing {name}")
        elif dtype and found[name][0] != dtype:
            problems.append(f"{path.name}: {name} is {found[name][0]}, expected {dtype}")
        elif shape and found[name][1] != shape:
            problems.append(f"{path.name}: {name} has shape {found[name][1]}, expected {shape}")

    model_dtype = _FLOAT.get(cfg["dtype"])
    pp = cfg["mapping"].get("pp_size", 1)
    if stage == 0:
        need("transformer.vocab_embedding.weight", model_dtype)
    if stage == pp - 1:
        need("transformer.ln_f.weight", model_dtype)
        need("lm_head.weight")
    for i in range(cfg["num_hidden_layers"] // pp):
        prefix = f"transformer.layers.{i}."
        need(prefix + "input_layernorm.weight", model_dtype)
        need(prefix + "post_layernorm.weight", model_dtype)
        for linear, (out, inp, _) in _linear_shapes(cfg).items():
            algo = _layer_algo(prefix + linear, quant, layers)
            if algo not in LAYOUTS:
                problems.append(
                    f"{path.name}: {prefix + linear} has quant_algo {algo}, not checked here"
                )
                continue
            dtype, leaves, (rows, cols) = LAYOUTS[algo]
            need(prefix + linear + ".weight", dtype or model_dtype, (out // rows, inp // cols))
            for leaf in leaves:
                need(f"{prefix}{linear}.{leaf}")
        if (cfg.get("moe") or {}).get("num_experts"):
            for leaf in ("router.weight", "fc.weight", "proj.weight"):
                need(f"{prefix}mlp.{leaf}")
        if quant.get("kv_cache_quant_algo"):
            need(prefix + "attention.kv_cache_scaling_factor", "F32", (1,))


def validate_tensorrt_llm_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a TensorRT-LLM checkpoint folder; returns its ``config.json``.

    Raises ValueError listing every problem found (missing or misshapen tensors, unknown
    ``quant_algo``, missing rank files, a ``MIXED_PRECISION`` config without ``quant_cfg.json``).
    """
    folder = Path(checkpoint_dir)
    problems: list[str] = []
    cfg = _load_json(folder / "config.json", problems)
    if cfg is not None:
        problems += [f"config.json: missing key {k!r}" for k in REQUIRED_KEYS if k not in cfg]
    if cfg is None or problems:
        raise ValueError(f"{folder} is not a TensorRT-LLM checkpoint: " + "; ".join(problems))
    known = {f.architecture for f in FAMILIES.values()}
    if cfg["architecture"] not in known:
        problems.append(f"architecture {cfg['architecture']!r} is not one of {sorted(known)}")
    mapping, quant = cfg["mapping"], cfg["quantization"]
    world = mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
    if mapping.get("world_size") != world:
        problems.append(
            f"mapping world_size {mapping.get('world_size')} != tp_size x pp_size {world}"
        )
    if quant.get("quant_algo") not in QUANT_ALGOS | {None}:
        problems.append(f"quant_algo {quant.get('quant_algo')!r} is not a TensorRT-LLM QuantAlgo")
    if quant.get("kv_cache_quant_algo") not in KV_CACHE_ALGOS | {None}:
        problems.append(
            f"kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not one of {sorted(KV_CACHE_ALGOS)}"
        )
    layers = None
    if quant.get("quant_algo") == "MIXED_PRECISION":
        per_layer = _load_json(folder / "quant_cfg.json", problems) or {}
        layers = per_layer.get("quantized_layers")
        if not isinstance(layers, dict):
            problems.append("quant_cfg.json has no quantized_layers")
            layers = {}
    expected = {f"rank{r}.safetensors" for r in range(world)}
    present = {p.name for p in folder.glob("rank*.safetensors")}
    problems += [f"missing {name}" for name in sorted(expected - present)]
    problems += [f"unexpected {name} for world_size {world}" for name in sorted(present - expected)]
    if not problems:
        for rank in range(world):
            stage = rank // mapping.get("tp_size", 1)
            _check_rank(folder / f"rank{rank}.safetensors", stage, cfg, layers, problems)
    if not problems:
        for rank in range(world):
            _check_scale_values(folder / f"rank{rank}.safetensors", problems)
    scaling = cfg.get("rotary_scaling")
    if scaling is not None and normalized_rotary_scaling(scaling) is None:
        from quant_core.diagnostics import QuantWarning

        warnings.warn(
            f"{folder}/config.json: rotary_scaling {scaling} describes no scaling; TensorRT-LLM "
            "<= 1.1 rejects a rotary_scaling without a known 'type' (ModelOpt writes null): write "
            "normalized_rotary_scaling(...) instead",
            QuantWarning,
            stacklevel=2,
        )
    if problems:
        raise ValueError(f"{folder} is not a valid TensorRT-LLM checkpoint: " + "; ".join(problems))
    return cfg


# scale tensors TensorRT-LLM multiplies by: finite everywhere, per-tensor ones positive
_SCALE_LEAVES = (
    "weights_scaling_factor", "weights_scaling_factor_2", "activation_scaling_factor",
    "prequant_scaling_factor", "kv_cache_scaling_factor", "per_channel_scale", "act_scale",
)  # fmt: skip


def _check_scale_values(path: Path, problems: list[str]) -> None:
    """Append a problem for every scale tensor in ``path`` holding NaN / inf (or a per-tensor scale <= 0)."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            if not key.endswith(_SCALE_LEAVES):
                continue
            value = f.get_tensor(key)
            if not value.is_floating_point():
                continue
            value = value.float()
            if not bool(value.isfinite().all()):
                problems.append(f"{path.name}: {key} holds NaN or infinite values")
            elif value.numel() == 1 and not bool((value > 0).all()):
                problems.append(f"{path.name}: {key} is {value.item()}, not a positive scale")


def normalized_rotary_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """``rotary_scaling`` as TensorRT-LLM reads it: None for no scaling (``rope_type`` "default" or
    no type, as transformers 5 reports plain RoPE), else a dict with ``type`` set."""
    if not scaling:
        return None
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in (None, "default"):
        return None
    return {**scaling, "type": kind}


def check_layout(folder: Path) -> dict[str, Any]:
    """The ``trtllm`` row's validator (:mod:`quant_export.layouts`): what ``validate`` reports."""
    quant = validate_tensorrt_llm_checkpoint(folder)["quantization"]
    return {
        "layers": [],
        "formats": [quant.get("quant_algo")],
        "kv_cache": quant.get("kv_cache_quant_algo"),
        "ignored": quant.get("exclude_modules") or [],
    }

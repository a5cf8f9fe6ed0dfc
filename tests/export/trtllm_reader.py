"""A reader of TensorRT-LLM checkpoints for the tests: rebuild the fake-quantized HF model from the files.

It is written from TensorRT-LLM's side, independently of the writer: the tensor names of
``tensorrt_llm/models/llama/model.py`` / ``gpt/model.py`` / ``layers/moe.py``, the rank merge that
inverts ``ColumnLinear`` / ``RowLinear`` / parallel-embedding splits, and the meaning each
``quant_algo`` gives the stored bytes at load (``modeling_utils.preprocess_perlayer_weights``):
weights are decoded here in float64 from their codes; activation and KV-cache quantization are
set up from the stored scales (amax = scale x format max) on a fresh model of the same family.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

import quant_core as mtq

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
FP8_IN = {"num_bits": (4, 3), "axis": None, "enable": True}
INT8_IN = {"num_bits": 8, "axis": None, "enable": True}
NVFP4_IN = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
    "axis": None,
    "enable": True,
}
FP8_TOKEN_IN = {"num_bits": (4, 3), "type": "dynamic", "block_sizes": {-1: None}, "enable": True}
# quant_algo -> (input quantizer attributes, amax = activation_scaling_factor x this)
INPUTS = {
    "FP8": (FP8_IN, 448.0),
    "W4A8_AWQ": (FP8_IN, 448.0),
    "W8A8_SQ_PER_CHANNEL": (INT8_IN, 127.0),
    "NVFP4": (NVFP4_IN, 6.0 * 448.0),
    "FP8_PER_CHANNEL_PER_TOKEN": (FP8_TOKEN_IN, None),
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN": (INT8_IN, 127.0),
}
SQ_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
# the quantizer of a plugin layer's input: the norm before it, or attention / mlp
SQ_INPUT = {
    "attention.qkv": "input_layernorm.scale_to_int",
    "mlp.fc": "post_layernorm.scale_to_int",
    "mlp.gate": "post_layernorm.scale_to_int",
    "attention.dense": "attention.quantization_scaling_factor",
    "mlp.proj": "mlp.quantization_scaling_factor",
}
KV_BOUND = {"FP8": ((4, 3), 448.0), "INT8": (8, 127.0)}
RATIO_DTYPE = torch.float16  # TensorRT-LLM stores W4A8 group scales / wsf2 in fp16
COLUMN = ("attention.qkv", "mlp.fc", "mlp.gate", "lm_head")

# TensorRT-LLM linear name in a decoder layer -> HF module names (outputs concatenated)
LLAMA = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
GPT2 = {
    "attention.qkv": ("attn.c_attn",),
    "attention.dense": ("attn.c_proj",),
    "mlp.fc": ("mlp.c_fc",),
    "mlp.proj": ("mlp.c_proj",),
}


def _merge(name: str, pieces: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    """One full tensor from its per-rank pieces (inverse of TensorRT-LLM's tensor-parallel split)."""
    first = pieces[0]
    if len(pieces) == 1:
        return first
    layer, _, leaf = name.rpartition(".")
    if "embedding" in layer:
        return torch.cat(pieces, dim=0)
    moe = (cfg.get("moe") or {}).get("num_experts") and layer.endswith(("mlp.fc", "mlp.proj"))
    if moe and leaf != "weight":  # per-expert and per-tensor scales: whole on every rank
        return first
    if moe and layer.endswith("mlp.fc"):  # [up_r; gate_r] per rank
        halves = [p.chunk(2, dim=1) for p in pieces]
        up, gate = (torch.cat([h[k] for h in halves], dim=1) for k in (0, 1))
        return torch.cat([up, gate], dim=1)
    if moe:
        return torch.cat(pieces, dim=2)
    per_tensor = first.numel() == 1 and leaf != "weight"
    if per_tensor or layer.endswith(("router", "layernorm", "ln_f")) or "kv_cache" in leaf:
        assert all(torch.equal(p, first) for p in pieces), name
        return first
    column = layer.endswith(COLUMN)
    if column:
        if leaf == "prequant_scaling_factor":
            return first
        if layer.endswith("attention.qkv"):
            return _merge_qkv(pieces, cfg)
        return torch.cat(pieces, dim=0)
    if first.dim() == 2 or leaf in ("prequant_scaling_factor", "smoother"):
        return torch.cat(pieces, dim=-1)
    return first  # a row-parallel layer's bias and per-output scales are whole on every rank


def _merge_qkv(pieces: list[torch.Tensor], cfg: dict) -> torch.Tensor:
    tp = len(pieces)
    heads = [cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_key_value_heads"]]
    total = sum(heads)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for piece in pieces:
        rows = piece.shape[0]  # packed INT4 weights hold half the rows; scales follow the rows
        sizes = [rows * h // total for h in heads]
        for part, chunk in zip(parts, torch.split(piece, sizes, dim=0)):
            part.append(chunk)
    assert all(len(p) == tp for p in parts)
    return torch.cat([torch.cat(p, dim=0) for p in parts], dim=0)


def _flat(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SmoothQuant plugin's (1, n) / (1, 1) parameters as vectors (layers.py SmoothQuantLinear)."""
    plugin = (".per_channel_scale", ".smoother", ".act_scale")
    return {k: v.reshape(-1) if k.endswith(plugin) else v for k, v in tensors.items()}


def read_checkpoint(folder: str | Path) -> tuple[dict, dict | None, dict[str, torch.Tensor]]:
    """(config.json, quant_cfg.json or None, every tensor merged over the ranks)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    mixed = folder / "quant_cfg.json"
    layers = json.loads(mixed.read_text()) if mixed.exists() else None
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    assert cfg["mapping"]["world_size"] == tp * pp
    per_stage = cfg["num_hidden_layers"] // pp
    merged = {}
    for stage in range(pp):  # rank = stage * tp + tp_rank; a stage numbers its layers from 0
        ranks = [_flat(load_file(folder / f"rank{stage * tp + t}.safetensors")) for t in range(tp)]
        assert all(set(r) == set(ranks[0]) for r in ranks)
        for name in ranks[0]:
            full = name
            if name.startswith("transformer.layers."):
                index, rest = name[len("transformer.layers.") :].split(".", 1)
                full = f"transformer.layers.{int(index) + stage * per_stage}.{rest}"
            assert full not in merged, full
            merged[full] = _merge(name, [r[name] for r in ranks], cfg)
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        merged[name] = merged[name][: cfg["vocab_size"]]
    if "transformer.position_embedding.weight" in merged:
        pos = merged["transformer.position_embedding.weight"]
        merged["transformer.position_embedding.weight"] = pos[: cfg["max_position_embeddings"]]
    return cfg, layers, merged


def layer_algo(name: str, cfg: dict, layers: dict | None) -> str | None:
    """The quant_algo TensorRT-LLM gives the linear layer ``name``."""
    if layers is not None:
        return layers["quantized_layers"].get(name, {}).get("quant_algo")
    quant = cfg["quantization"]
    if any(fnmatch.fnmatchcase(name, p) for p in quant.get("exclude_modules") or []):
        return None
    return quant["quant_algo"]


def _unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int8 (out/2, in) -> signed codes (out, in): row 2r in the low nibble."""
    b = packed.view(torch.uint8).to(torch.int64)
    low, high = b & 0xF, b >> 4
    codes = torch.stack([low, high], dim=1).reshape(-1, b.shape[1])
    return torch.where(codes >= 8, codes - 16, codes).double()


def _groups(scale: torch.Tensor, columns: int) -> torch.Tensor:
    return scale.double().repeat_interleave(columns // scale.shape[-1], dim=-1)


def decode_weight(t: dict[str, torch.Tensor], algo: str | None) -> torch.Tensor:
    """A linear layer's (out, in) float64 weight as TensorRT-LLM computes with it."""
    w = t["weight"]
    if algo is None:
        return w.double()
    if (
        algo == "W8A16"
    ):  # quantized per channel at load: absmax / 127 (convert_utils.weight_only_quantize)
        scale = w.double().abs().amax(dim=1, keepdim=True) / 127
        return torch.round(w.double() / scale) * scale
    if algo == "FP8":
        return w.double() * t["weights_scaling_factor"].double()
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return w.double() * t["per_channel_scale"].double()[:, None]
    if algo == SQ_PLUGIN:  # accumulator x act_scale x per_channel_scale, input x scale_to_int
        scale = t["per_channel_scale"].double() * t["act_scale"].double() / t["_x_scale"].double()
        return w.double() * scale[:, None]
    if algo == "W8A8_SQ_PER_CHANNEL":
        return w.double() * t["weights_scaling_factor"].double()[:, None]
    if algo == "W4A16_AWQ":
        codes = _unpack_int4_rows(w)
        return codes * _groups(t["weights_scaling_factor"], codes.shape[1])
    if algo == "W4A8_AWQ":  # int4 x fp16(wsf / wsf2) fed to an FP8 GEMM, times alpha's wsf2
        codes = _unpack_int4_rows(w)
        wsf2 = t["weights_scaling_factor_2"].double()
        ratio = (t["weights_scaling_factor"].double() / wsf2).to(RATIO_DTYPE).double()
        fp8 = (codes * _groups(ratio, codes.shape[1])).to(torch.float8_e4m3fn).double()
        return fp8 * wsf2
    if algo == "NVFP4":
        b = w.to(torch.int64)
        codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1)
        values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).double()
        # one float32 scale per block: E4M3 block scale x FP32 global scale, as NVFP4 GEMMs form it
        block = t["weights_scaling_factor"].float() * t["weights_scaling_factor_2"].float()
        return values * _groups(block, values.shape[1])
    raise AssertionError(f"reader does not know {algo}")


def _leaves(merged: dict[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    return {k[len(layer) + 1 :]: v for k, v in merged.items() if k.startswith(layer + ".")}


def _split_out(w: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(w, sizes, dim=0))


def rebuild(folder: str | Path, fresh: torch.nn.Module) -> torch.nn.Module:
    """``fresh`` (an unquantized model of the same family) turned into the checkpoint's fake-quant model."""
    cfg, layers, merged = read_checkpoint(folder)
    gpt = cfg["architecture"] == "GPTForCausalLM"
    moe = bool((cfg.get("moe") or {}).get("num_experts"))
    hf_layers = "transformer.h" if gpt else "model.layers"
    table = GPT2 if gpt else {k: v for k, v in LLAMA.items() if not (moe and k.startswith("mlp"))}
    quant_cfg: dict = {"*": {"enable": False}}
    plan = []  # (hf module name(s), trt layer, algo)
    n = cfg["num_hidden_layers"]
    for i in range(n):
        for trt, hf_names in table.items():
            name = f"transformer.layers.{i}.{trt}"
            plan.append(
                ([f"{hf_layers}.{i}.{h}" for h in hf_names], name, layer_algo(name, cfg, layers))
            )
    plan.append((["lm_head"], "lm_head", layer_algo("lm_head", cfg, layers)))
    for hf_names, _, algo in plan:
        for h in hf_names:
            if algo in INPUTS:
                quant_cfg[f"{h}.input_quantizer"] = INPUTS[algo][0]
    kv = cfg["quantization"].get("kv_cache_quant_algo")
    if kv:
        quant_cfg["*[kv]_bmm_quantizer"] = {
            "num_bits": KV_BOUND[kv][0],
            "axis": None,
            "enable": True,
        }
    expert_algo = {}
    if moe:
        for i in range(n):
            for trt, which in (("fc", "gate_up_proj"), ("proj", "down_proj")):
                algo = layer_algo(f"transformer.layers.{i}.mlp.{trt}", cfg, layers)
                expert_algo[(i, trt)] = algo
                if algo in INPUTS:  # ModelOpt's name: every expert's input quantizer
                    quant_cfg[f"model.layers.{i}.mlp.experts.{which}_input_quantizer"] = INPUTS[
                        algo
                    ][0]
    with warnings.catch_warnings():  # weight-only formats enable no quantizer here
        warnings.simplefilter("ignore", RuntimeWarning)
        mtq.quantize(fresh, {"quant_cfg": quant_cfg, "algorithm": None})
    modules = dict(fresh.named_modules())
    with torch.no_grad():
        _load_plain(modules, merged, cfg, gpt, moe)
        for hf_names, trt, algo in plan:
            t = _leaves(merged, trt)
            if algo == SQ_PLUGIN:
                layer, kind = trt.rsplit(".", 2)[0], trt.split(".", 3)[-1]
                t["_x_scale"] = 1.0 / merged[f"{layer}.{SQ_INPUT[kind]}"].double()
                t["activation_scaling_factor"] = t["_x_scale"]
                if "smoother" in t:
                    t["prequant_scaling_factor"] = 1.0 / t["smoother"].double()
            weight = decode_weight(t, algo)
            parts = [modules[h] for h in hf_names]
            if trt.endswith("qkv") and len(parts) == 3:
                hs = cfg["head_size"]
                sizes = [cfg["num_attention_heads"] * hs] + [cfg["num_key_value_heads"] * hs] * 2
                weights, biases = (
                    _split_out(weight, sizes),
                    (_split_out(t["bias"], sizes) if "bias" in t else [None] * 3),
                )
            else:
                weights, biases = [weight], [t.get("bias")]
            for module, w, b in zip(parts, weights, biases):
                _set_linear(module, w, b, t, algo)
        for (i, trt), algo in expert_algo.items():
            _load_experts(
                modules[f"model.layers.{i}.mlp.experts"],
                _leaves(merged, f"transformer.layers.{i}.mlp.{trt}"),
                trt,
                algo,
            )
        if kv:
            for i in range(n):
                scale = merged[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
                attn = modules[f"{hf_layers}.{i}.{'attn' if gpt else 'self_attn'}"]
                for q in (attn.k_bmm_quantizer, attn.v_bmm_quantizer):
                    q.amax = (scale.double() * KV_BOUND[kv][1]).float().reshape(())
    return fresh


def _set_linear(module, weight, bias, t, algo) -> None:
    module.weight.copy_(weight.to(module.weight.dtype).reshape(module.weight.shape))
    if bias is not None:
        module.bias.copy_(bias.to(module.bias.dtype))
    iq = module.input_quantizer
    if "prequant_scaling_factor" in t:
        iq.pre_quant_scale = t["prequant_scaling_factor"].float()
    if algo in INPUTS and INPUTS[algo][1] is not None:
        iq.amax = (t["activation_scaling_factor"].double() * INPUTS[algo][1]).float().reshape(())


def _load_experts(experts, t, trt, algo) -> None:
    weights = t["weight"].double()
    if algo == "FP8":
        weights = weights * t["weights_scaling_factor"].double()[:, :, None]
    else:
        assert algo is None, algo
    for e, w in enumerate(weights):
        if trt == "fc":
            up, gate = w.chunk(2, dim=0)
            experts.gate_up_proj[e].copy_(torch.cat([gate, up]).float())
        else:
            experts.down_proj[e].copy_(w.float())
        if algo == "FP8":
            projection = (experts.quant_up_proj if trt == "fc" else experts.quant_down_proj)[e]
            projection.input_quantizer.amax = (
                (t["activation_scaling_factor"].double() * 448).float().reshape(())
            )


def _load_plain(modules, merged, cfg, gpt, moe) -> None:
    layers = "transformer.h" if gpt else "model.layers"
    norms = (
        {"input_layernorm": "ln_1", "post_layernorm": "ln_2"}
        if gpt
        else {
            "input_layernorm": "input_layernorm",
            "post_layernorm": "post_attention_layernorm",
        }
    )
    pairs = {
        "transformer.vocab_embedding.weight": (
            "transformer.wte" if gpt else "model.embed_tokens",
            "weight",
        ),
        "transformer.ln_f.weight": ("transformer.ln_f" if gpt else "model.norm", "weight"),
    }
    if gpt:
        pairs["transformer.position_embedding.weight"] = ("transformer.wpe", "weight")
        pairs["transformer.ln_f.bias"] = ("transformer.ln_f", "bias")
    for i in range(cfg["num_hidden_layers"]):
        for trt, hf in norms.items():
            for leaf in ("weight", "bias"):
                if f"transformer.layers.{i}.{trt}.{leaf}" in merged:
                    pairs[f"transformer.layers.{i}.{trt}.{leaf}"] = (f"{layers}.{i}.{hf}", leaf)
        if moe:
            pairs[f"transformer.layers.{i}.mlp.router.weight"] = (
                f"model.layers.{i}.mlp.gate",
                "weight",
            )
    for trt, (hf, leaf) in pairs.items():
        getattr(modules[hf], leaf).copy_(merged[trt].float())

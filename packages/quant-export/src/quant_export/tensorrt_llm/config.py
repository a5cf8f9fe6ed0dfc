"""``config.json`` of a TensorRT-LLM checkpoint: the ``PretrainedConfig`` of the model.

Keys follow ``tensorrt_llm/models/modeling_utils.py`` (``PretrainedConfig.__init__`` and
``to_dict``, ``QuantConfig``), ``tensorrt_llm/models/llama/config.py`` (``LLaMAConfig``:
``mlp_bias``, ``attn_bias``, ``rotary_base``, ``rotary_scaling``, ``moe``; Mixtral's gated
activation written as ``swiglu``), ``tensorrt_llm/models/qwen/config.py`` (``qwen_type``) and
``tensorrt_llm/models/gpt/config.py``; ``logits_dtype`` and ``use_parallel_embedding`` as
ModelOpt writes them (``modelopt/torch/export/tensorrt_llm_utils.py``).
"""

from __future__ import annotations

from typing import Any

from quant_export._version import __version__
from quant_export.tensorrt_llm.families import Family
from quant_export.tensorrt_llm.validate import normalized_rotary_scaling

# tensorrt_llm/layers/moe.py MoeConfig.ExpertScaleNormalizationMode.RENORMALIZE
RENORMALIZE = 1


def _rope(hf: Any) -> tuple[float, dict | None]:
    """(rotary_base, rotary_scaling) from a transformers 4 (rope_theta) or 5 (rope_parameters) config."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    base = params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling = getattr(hf, "rope_scaling", None)
    if params.get("rope_type", "default") != "default":
        scaling = {"type": params["rope_type"], **params}
    # plain RoPE is no scaling: TensorRT-LLM <= 1.1 rejects {"rope_type": "default"}
    return float(base), normalized_rotary_scaling(scaling)


def _attribute(hf: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(hf, name, None)
        if value is not None:
            return value
    return default


def check_parallel(hf: Any, tp: int, pp: int) -> None:
    """Raise one clear line when the heads or layers cannot be split over ``tp`` x ``pp`` ranks."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel must be >= 1, got tp={tp}, pp={pp}")
    heads = _attribute(hf, "num_attention_heads", "n_head")
    kv_heads = _attribute(hf, "num_key_value_heads", default=heads)
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % tp:
            raise ValueError(f"{count} {what} are not divisible by inference_tensor_parallel={tp}")
    layers = _attribute(hf, "num_hidden_layers", "n_layer")
    if layers % pp:
        raise ValueError(f"{layers} layers are not divisible by inference_pipeline_parallel={pp}")


def pretrained_config(
    hf: Any,
    family: Family,
    dtype: str,
    tp: int,
    pp: int,
    quantization: dict[str, Any],
    biases: dict[str, bool],
) -> dict[str, Any]:
    """The TensorRT-LLM ``PretrainedConfig`` dict of a transformers config ``hf``."""
    heads = _attribute(hf, "num_attention_heads", "n_head")
    hidden = _attribute(hf, "hidden_size", "n_embd")
    gpt = family.architecture == "GPTForCausalLM"
    config: dict[str, Any] = {
        "producer": {"name": "quant-export", "version": __version__},
        "architecture": family.architecture,
        "dtype": dtype,
        "logits_dtype": "float16" if dtype == "bfloat16" else dtype,
        "num_hidden_layers": _attribute(hf, "num_hidden_layers", "n_layer"),
        "num_attention_heads": heads,
        "num_key_value_heads": _attribute(hf, "num_key_value_heads", default=heads),
        "hidden_size": hidden,
        "intermediate_size": _attribute(hf, "intermediate_size", "n_inner", default=4 * hidden),
        "head_size": _attribute(hf, "head_dim", default=hidden // heads),
        "vocab_size": hf.vocab_size,
        "max_position_embeddings": _attribute(hf, "max_position_embeddings", "n_positions"),
        "hidden_act": _attribute(hf, "activation_function", "hidden_act"),
        "norm_epsilon": _attribute(hf, "rms_norm_eps", "layer_norm_epsilon", default=1e-5),
        "position_embedding_type": "learned_absolute" if gpt else "rope_gpt_neox",
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "bias": biases["attn"],
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": quantization,
    }
    if gpt:
        config["gpt_variant"] = hf.model_type  # GPTConfig.from_hugging_face: "gpt2"
    else:
        config["rotary_base"], config["rotary_scaling"] = _rope(hf)
        config["attn_bias"] = biases["attn"]
        config["mlp_bias"] = biases["mlp"]
        experts = getattr(hf, "num_local_experts", 0) or 0
        config["moe"] = {
            "num_experts": experts,
            "top_k": getattr(hf, "num_experts_per_tok", 0) if experts else 0,
            "normalization_mode": RENORMALIZE if experts else None,
        }
        if experts:
            config["hidden_act"] = "swiglu"
            config["mapping"].update(moe_tp_size=tp, moe_ep_size=1)
    if family.architecture.startswith("Qwen"):
        # QWenDecoderLayer (tensorrt_llm/models/qwen/model.py) turns on q/k RMSNorms for qwen3
        config["qwen_type"] = hf.model_type
        config["qk_layernorm"] = hf.model_type == "qwen3"
    return config

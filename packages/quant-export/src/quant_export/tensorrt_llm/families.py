"""Which Hugging Face module becomes which TensorRT-LLM tensor, per model family (plain data).

TensorRT-LLM's names come from its model classes: ``tensorrt_llm/models/llama/model.py``
(``transformer.vocab_embedding``, ``transformer.layers.{i}.input_layernorm``, ``attention.qkv``,
``attention.dense``, ``post_layernorm``, ``mlp.fc`` / ``mlp.gate`` / ``mlp.proj``,
``transformer.ln_f``, ``lm_head``), ``tensorrt_llm/models/gpt/model.py`` (the same plus
``transformer.position_embedding``), ``tensorrt_llm/models/qwen/model.py`` (``QWenDecoderLayer``:
the Llama names; Qwen3's q/k RMSNorms through ``Attention(qk_layernorm=...)``, named as ModelOpt's
``AttentionConfig.q_layernorm`` / ``k_layernorm``) and ``tensorrt_llm/layers/mlp.py`` (``GatedMLP``:
``proj(act(fc(x)) * gate(x))``, so HF ``gate_proj`` -> ``fc`` and ``up_proj`` -> ``gate``; the
fused form in ``modeling_utils.fuse_gate_mlp`` concatenates ``[gate, fc]``). Mixtral-style MoE
follows ``tensorrt_llm/layers/moe.py``: ``mlp.router`` (float32, not split), ``mlp.fc``
(experts stacked, ``[w3 (up); w1 (gate)]`` along the output axis) and ``mlp.proj`` (w2). The
architecture names and config keys follow ``tensorrt_llm/models/__init__.py`` (``MODEL_MAP``) and
``tensorrt_llm/models/llama/config.py`` / ``gpt/config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMN, ROW = "column", "row"


@dataclass(frozen=True)
class LinearMap:
    """One TensorRT-LLM linear layer: its name in a decoder layer, the HF modules whose outputs it concatenates, and how it is split."""

    trt: str
    hf: tuple[str, ...]
    parallel: str  # COLUMN (split outputs) or ROW (split inputs)
    heads: bool = False  # outputs are [q; k; v] head blocks (split each part by heads)


@dataclass(frozen=True)
class Family:
    """How one model family's HF module names map to TensorRT-LLM's."""

    architecture: str
    layers: str  # HF prefix of the decoder layer list
    embedding: str
    position_embedding: str | None
    final_norm: str
    norms: dict[str, str]  # HF name in a layer -> TensorRT-LLM name
    linears: tuple[LinearMap, ...]
    attention: str  # HF attention module in a layer (holds the KV-cache quantizers)
    moe: str | None = None  # HF fused-experts module in a layer
    router: str | None = None


_LLAMA_ATTENTION = (
    LinearMap(
        "attention.qkv",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        COLUMN,
        heads=True,
    ),
    LinearMap("attention.dense", ("self_attn.o_proj",), ROW),
)
_LLAMA_MLP = (
    LinearMap("mlp.fc", ("mlp.gate_proj",), COLUMN),
    LinearMap("mlp.gate", ("mlp.up_proj",), COLUMN),
    LinearMap("mlp.proj", ("mlp.down_proj",), ROW),
)
_LLAMA_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}


def _llama(architecture: str, **extra) -> Family:
    base = dict(
        architecture=architecture,
        layers="model.layers",
        embedding="model.embed_tokens",
        position_embedding=None,
        final_norm="model.norm",
        norms=dict(_LLAMA_NORMS),
        linears=_LLAMA_ATTENTION + _LLAMA_MLP,
        attention="self_attn",
    )
    base.update(extra)
    return Family(**base)


FAMILIES: dict[str, Family] = {
    "llama": _llama("LlamaForCausalLM"),
    "mistral": _llama("MistralForCausalLM"),
    "qwen2": _llama("Qwen2ForCausalLM"),
    # Qwen3's per-head q/k RMSNorms: ModelOpt's AttentionConfig.q_layernorm / k_layernorm
    # (modelopt/torch/export/model_config.py) under the attention layer.
    "qwen3": _llama(
        "Qwen3ForCausalLM",
        norms={
            **_LLAMA_NORMS,
            "self_attn.q_norm": "attention.q_layernorm",
            "self_attn.k_norm": "attention.k_layernorm",
        },
    ),
    "mixtral": _llama(
        "MixtralForCausalLM",
        linears=_LLAMA_ATTENTION,
        moe="mlp.experts",
        router="mlp.gate",
    ),
    "gpt2": Family(
        architecture="GPTForCausalLM",
        layers="transformer.h",
        embedding="transformer.wte",
        position_embedding="transformer.wpe",
        final_norm="transformer.ln_f",
        norms={"ln_1": "input_layernorm", "ln_2": "post_layernorm"},
        linears=(
            LinearMap("attention.qkv", ("attn.c_attn",), COLUMN, heads=True),
            LinearMap("attention.dense", ("attn.c_proj",), ROW),
            LinearMap("mlp.fc", ("mlp.c_fc",), COLUMN),
            LinearMap("mlp.proj", ("mlp.c_proj",), ROW),
        ),
        attention="attn",
    ),
}
# decoder_type as ModelOpt names it (modelopt/torch/export/model_utils.py) -> transformers model_type(s)
DECODER_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral", "qwen2", "qwen3", "mixtral"),
    "qwen": ("qwen2", "qwen3"),
    "mistral": ("mistral",),
    "mixtral": ("mixtral",),
    "gpt": ("gpt2",),
    "gpt2": ("gpt2",),
}


def family_of(model_type: str, decoder_type: str) -> Family:
    """The family table row for a transformers ``model_type`` exported as ``decoder_type``."""
    if decoder_type not in DECODER_TYPES:
        raise ValueError(
            f"decoder_type {decoder_type!r} is not supported for TensorRT-LLM checkpoints; "
            f"choose one of {sorted(DECODER_TYPES)}"
        )
    if model_type not in DECODER_TYPES[decoder_type] or model_type not in FAMILIES:
        raise ValueError(
            f"architecture {model_type!r} cannot be exported as decoder_type {decoder_type!r}; "
            f"{decoder_type!r} covers {', '.join(DECODER_TYPES[decoder_type])}"
        )
    return FAMILIES[model_type]

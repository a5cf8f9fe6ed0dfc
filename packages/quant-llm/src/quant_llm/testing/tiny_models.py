"""Tiny, randomly initialised Hugging Face models built from configs (no download), for tests and examples.

Each family keeps its real architecture (attention classes, MLP, norms, MoE experts) at a few
thousand parameters: 2 layers, hidden 64, 4 heads (2 KV heads where the family has GQA).
"""

from __future__ import annotations

from typing import Any

import torch

# Small config overrides per model type; the key is the transformers ``model_type``.
_COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": {**_COMMON, "head_dim": 16},
    "gemma": {**_COMMON, "head_dim": 16},
    "phi": dict(_COMMON),
    "gpt2": {
        "vocab_size": 256,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "bert": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    },
    "mixtral": {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
}
FAMILIES: tuple[str, ...] = tuple(TINY_CONFIGS)
MOE_FAMILIES: tuple[str, ...] = ("mixtral",)
ENCODER_FAMILIES: tuple[str, ...] = ("bert",)


def tiny_config(family: str, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    """The small transformers config of ``family`` (one of :data:`FAMILIES`), with ``overrides``."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ValueError(
            f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}"
        )
    config = AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})
    config._attn_implementation = attn_implementation
    return config


def tiny_model(
    family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any
) -> torch.nn.Module:
    """A tiny fp32 model of ``family`` in eval mode: a causal LM, or ``BertModel`` for ``bert``."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(family, attn_implementation, **overrides)
    torch.manual_seed(seed)
    factory = AutoModel if family in ENCODER_FAMILIES else AutoModelForCausalLM
    model = factory.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


def random_token_batches(
    vocab_size: int = 256, batches: int = 2, batch_size: int = 2, seq_len: int = 16, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches of random token ids (``input_ids`` and ``attention_mask``) for calibration."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out

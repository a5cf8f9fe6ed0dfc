"""``genai_config.json``: what onnxruntime-genai reads to run the decoder.

Fields and names as onnxruntime-genai's builder writes them for a decoder-only model
(``make_genai_config`` in ``onnxruntime_genai/models/builders/base.py``, microsoft/onnxruntime-genai
0.18): ``model.decoder`` names the graph file, its head/hidden sizes and its input/output names
(``past_key_values.%d.key`` ...), ``search`` holds greedy defaults with a shared past/present
buffer (GroupQueryAttention writes the cache in place).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quant_export.onnx_genai.graph import DecoderSpec

__all__ = ["genai_config"]


def _token_ids(model: nn.Module) -> tuple[Any, Any, Any]:
    """(bos, eos, pad) ids: generation_config first (as the builder reads them), then config."""
    found = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = None
        for source in (getattr(model, "generation_config", None), model.config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                break
        found.append(value)
    bos, eos, pad = found
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return bos, eos, pad


def genai_config(model: nn.Module, spec: DecoderSpec, filename: str) -> dict[str, Any]:
    """The genai_config.json dict of the decoder ``spec`` stored in ``filename``."""
    bos, eos, pad = _token_ids(model)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": spec.head_dim,
        "hidden_size": spec.hidden,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
    }
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": spec.context_length,
            "decoder": decoder,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model.config.model_type,
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }

"""Offline rotations of a decoder's residual stream and attention values, folded into its weights (QuaRot-like).

An orthogonal ``Q`` applied to the residual stream spreads outlier channels over all channels,
which helps 4-bit activations (W4A4). With the RMSNorm scales folded into the layers that read
the normalized stream, RMSNorm commutes with ``Q`` (``||x Q|| = ||x||``), so rotating the
embedding, every reader (``W ← W Q``) and every writer (``W ← Qᵀ W``) leaves the float model's
outputs unchanged. A per-head rotation of the values (``v_proj`` rows, ``o_proj`` columns) is
folded the same way. Nothing runs online: the result is a plain model with new weights (norm
scales of one, ``lm_head`` untied) that quantizes and exports as any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quant_core.nn.rotation import normalized_hadamard_transform

__all__ = ["SUPPORTED_MODEL_TYPES", "random_hadamard", "rotate_model"]

# Decoders whose blocks are pre-RMSNorm (weight only, no "1 + w") with q/k/v/o and gate/up/down.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """A random orthogonal ``n x n`` float64 matrix with Hadamard structure.

    ``n = 2^k · m``: the Kronecker product of a normalized Sylvester Hadamard of order ``2^k`` and
    a random orthogonal ``m x m`` (QR of a Gaussian), with random signs on the rows.
    """
    if n < 1:
        raise ValueError(f"random_hadamard: need n >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    size = n & -n  # largest power of two dividing n
    had = torch.eye(size, dtype=torch.float64)
    if size > 1:  # the rows of the identity, transformed: the normalized Sylvester matrix
        had = normalized_hadamard_transform(had)
    m = n // size
    ortho, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    ortho *= torch.sign(torch.diagonal(r)).unsqueeze(0)
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return signs.unsqueeze(1) * torch.kron(had, ortho.contiguous())


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Move the RMSNorm scale into the input columns of the layers that read its output."""
    w = norm.weight.detach().double()
    for layer in readers:
        layer.weight.data = (layer.weight.detach().double() * w).to(layer.weight.dtype)
    norm.weight.data.fill_(1.0)


def _rotate_in(layer: nn.Module, q: Tensor) -> None:
    """``W ← W Q``: the layer now reads the rotated stream ``x Q``."""
    layer.weight.data = (layer.weight.detach().double() @ q).to(layer.weight.dtype)


def _rotate_out(layer: nn.Linear, q: Tensor) -> None:
    """``W ← Qᵀ W``, ``b ← b Q``: the layer now writes the rotated stream."""
    layer.weight.data = (q.T @ layer.weight.detach().double()).to(layer.weight.dtype)
    if layer.bias is not None:
        layer.bias.data = (layer.bias.detach().double() @ q).to(layer.bias.dtype)


def _check(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"rotate_model: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (pre-RMSNorm decoders)"
        )
    if any(hasattr(m, "weight_quantizer") for m in model.modules()):
        raise ValueError("rotate_model: rotate the float model before mtq.quantize, not after")
    if not hasattr(model, "lm_head"):
        raise ValueError("rotate_model: needs a causal LM with an lm_head (AutoModelForCausalLM)")


def rotate_model(model: nn.Module, seed: int = 0, values: bool = True) -> nn.Module:
    """Fold a random Hadamard rotation of the residual stream (and, with ``values``, a per-head
    one of the attention values) into the weights of a Hugging Face decoder, in place.

    The float outputs stay the same up to rounding; call it before ``mtq.quantize``. ``lm_head``
    is untied from the embedding (``config.tie_word_embeddings`` becomes False).
    """
    _check(model)
    base = model.model
    with torch.no_grad():
        if model.lm_head.weight is base.embed_tokens.weight:
            model.lm_head.weight = nn.Parameter(base.embed_tokens.weight.detach().clone())
            model.config.tie_word_embeddings = False
        q = random_hadamard(model.config.hidden_size, seed)
        head_dim = getattr(model.config, "head_dim", None) or (
            model.config.hidden_size // model.config.num_attention_heads
        )
        qv = random_hadamard(head_dim, seed + 1)
        _rotate_in(base.embed_tokens, q)
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            _fold_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            _fold_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for layer in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _rotate_in(layer, q)
            for layer in (attn.o_proj, mlp.down_proj):
                _rotate_out(layer, q)
            if values:
                _rotate_heads(attn, qv, head_dim)
        _fold_norm(base.norm, [model.lm_head])
        _rotate_in(model.lm_head, q)
    return model


def _rotate_heads(attn: nn.Module, qv: Tensor, head_dim: int) -> None:
    """Rotate each value head by ``qv``: ``v_proj`` writes ``v qv``, ``o_proj`` reads it back."""
    v = attn.v_proj
    rows = v.weight.detach().double().unflatten(0, (-1, head_dim))  # (heads, hd, in)
    v.weight.data = (qv.T @ rows).flatten(0, 1).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (v.bias.detach().double().unflatten(0, (-1, head_dim)) @ qv).flatten()
        v.bias.data = v.bias.data.to(attn.o_proj.weight.dtype)
    o = attn.o_proj
    cols = o.weight.detach().double().unflatten(1, (-1, head_dim))  # (out, heads, hd)
    o.weight.data = (cols @ qv).flatten(1, 2).to(o.weight.dtype)

"""Perplexity of a causal language model on a text, in non-overlapping windows."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_llm.calib_data import tokenize_windows


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int = 1024,
    num_windows: int | None = 20,
    batch_size: int = 1,
) -> float:
    """Return exp(mean next-token NLL) over the first ``num_windows`` windows of ``seq_len`` tokens.

    Windows do not overlap and each predicts ``seq_len - 1`` tokens (the first token of a window has
    no context), so 20 windows of 1,024 score 20,460 tokens. ``num_windows=None`` uses the whole text.
    """
    return windows_perplexity(
        model, tokenize_windows(tokenizer, text, seq_len, num_windows), batch_size
    )


def windows_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) of ``model`` over token ``windows`` (a LongTensor (n, seq_len))."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", leave=False):
                ids = windows[start : start + batch_size].to(device)
                total_nll += next_token_nll(model(input_ids=ids).logits, ids)
                total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (computed in float32)."""
    logits = logits.float()
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    ).item()

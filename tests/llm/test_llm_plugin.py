"""The quant_core.plugins entry point: quantizing an HF model needs no quant_llm import or call."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, GPT2Config
import quant_core as mtq
assert "quant_llm" not in sys.modules
config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
model = AutoModelForCausalLM.from_config(config)
ids = torch.arange(16).view(1, 16)
mtq.quantize(model, mtq.FP8_KV_CFG, lambda m: m(input_ids=ids))
attn = model.transformer.h[0].attn
print(type(model.transformer.h[0].mlp.c_fc).__name__, type(attn).__name__, float(attn.k_bmm_quantizer.amax) > 0)
"""


def test_entry_point_is_declared():
    names = {ep.value for ep in entry_points(group="quant_core.plugins")}
    assert "quant_llm.plugin:register" in names


def test_quantize_maps_hf_modules_with_no_quant_llm_import():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["QuantConv1D", "QuantGPT2Attention", "True"]


def test_register_model_maps_a_family_outside_the_known_list(forward_loop):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import quant_core as mtq
    from quant_core.nn import QuantModuleRegistry
    from quant_llm import register_model
    from quant_llm.plugin import KNOWN_FAMILIES

    assert "cohere" not in KNOWN_FAMILIES
    config = AutoConfig.for_model(
        "cohere",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    attention_cls = type(model.model.layers[0].self_attn)
    register_model(model)
    assert QuantModuleRegistry.get(attention_cls) is not None
    mtq.quantize(model, mtq.FP8_KV_CFG, forward_loop)
    assert model.model.layers[0].self_attn.k_bmm_quantizer.amax.item() > 0

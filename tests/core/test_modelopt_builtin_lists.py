"""Built-in configs hold ModelOpt 0.47's entry lists, so list arithmetic on them means what it means there.

ModelOpt 0.47 documents its presets as ``[*_base_disable_all, <weight / input entries>,
*_default_disabled_quantizer_cfg]`` and its KV configs as KV entries only, "designed to be merged
with a primary quantization config"; the natural way to add a KV cache to a preset is
``FP8_DEFAULT_CFG["quant_cfg"] + FP8_KV_CFG["quant_cfg"]``.
"""

from __future__ import annotations

import pytest
import torch
from core_models import make_tiny_llama
from torch import nn

import quant_core as mtq
from quant_core.config import _base_disable_all, _default_disabled_quantizer_cfg
from quant_core.conversion import iter_quantizers

KV_CONFIGS = [
    "FP8_KV_CFG",
    "FP8_AFFINE_KV_CFG",
    "NVFP4_KV_CFG",
    "NVFP4_AFFINE_KV_CFG",
    "NVFP4_KV_ROTATE_CFG",
]
WA_CONFIGS = sorted(mtq.choices - set(KV_CONFIGS))
# Presets that quantize parts of a model (by module name) or add exclusions after the defaults.
PARTIAL = {n for n in WA_CONFIGS if "MLP" in n or "EXPERTS" in n or n.startswith("MAMBA_MOE_")}


def _states(model: nn.Module) -> dict[str, str]:
    return {n: repr(q) for n, q, _p in iter_quantizers(model) if q.is_enabled}


@pytest.mark.parametrize("name", KV_CONFIGS)
def test_kv_configs_hold_only_their_kv_entries(name: str) -> None:
    entries = list(getattr(mtq, name)["quant_cfg"])
    assert entries, name
    for entry in entries:
        assert entry["quantizer_name"] != "*" and entry["quantizer_name"].endswith("_bmm_quantizer")
    assert "algorithm" not in getattr(mtq, name) or name == "NVFP4_KV_ROTATE_CFG"


@pytest.mark.parametrize("name", WA_CONFIGS)
def test_presets_are_disable_all_then_formats_then_the_default_exclusions(name: str) -> None:
    entries = list(getattr(mtq, name)["quant_cfg"])
    n = len(_default_disabled_quantizer_cfg)
    assert entries[:1] == _base_disable_all
    start = next(i for i, e in enumerate(entries) if e == _default_disabled_quantizer_cfg[0])
    assert entries[start : start + n] == _default_disabled_quantizer_cfg
    middle, after = entries[1:start], entries[start + n :]
    assert all("enable" not in e for e in middle if "cfg" in e)  # cfg alone enables
    if name.startswith("MAMBA_MOE_"):  # then the Mamba-MoE exclusions (conservative: two more)
        assert after[:8] == mtq.config._mamba_moe_disabled_quantizer_cfg
        assert len(after) == (10 if "CONSERVATIVE" in name else 8)
    else:
        assert after == []
    if name not in PARTIAL:
        assert [e["quantizer_name"] for e in middle] in (
            ["*weight_quantizer", "*input_quantizer"],
            ["*weight_quantizer"],  # W4A16_NVFP4_CFG names no input entry
        )


def test_building_blocks_are_entry_lists_that_recipes_spread() -> None:
    assert _base_disable_all == [{"quantizer_name": "*", "enable": False}]
    assert all(
        isinstance(e, dict) and isinstance(e["quantizer_name"], str) and e["enable"] is False
        for e in _default_disabled_quantizer_cfg
    )
    recipe = [
        *_base_disable_all,
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "enable": False},
        *_default_disabled_quantizer_cfg,
    ]
    assert recipe == mtq.INT8_WEIGHT_ONLY_CFG["quant_cfg"]


def test_a_recipe_spreading_the_exclusions_leaves_heads_and_routers_unquantized() -> None:
    model = nn.ModuleDict(
        {"body": nn.Linear(8, 8), "router": nn.Linear(8, 4), "lm_head": nn.Linear(8, 16)}
    )
    config = {
        "quant_cfg": [
            *_base_disable_all,
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            *_default_disabled_quantizer_cfg,
        ],
        "algorithm": None,  # nothing to calibrate: the model never runs
    }
    mtq.quantize(model, config)
    assert sorted(_states(model)) == ["body.weight_quantizer"]


def _llama_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2)]


def test_preset_plus_kv_list_quantizes_weights_activations_and_the_kv_cache() -> None:
    batches = _llama_batches()
    summed = {
        "quant_cfg": mtq.FP8_DEFAULT_CFG["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"],
        "algorithm": "max",
    }
    model = make_tiny_llama()
    mtq.quantize(model, summed, lambda m: [m(b) for b in batches])
    states = _states(model)
    attn = "model.layers.0.self_attn"
    for name in (
        f"{attn}.q_proj.weight_quantizer",
        f"{attn}.q_proj.input_quantizer",
        f"{attn}.k_bmm_quantizer",
        f"{attn}.v_bmm_quantizer",
        "model.layers.0.mlp.down_proj.weight_quantizer",
    ):
        assert name in states and "FP8 E4M3" in states[name], name
    assert not any("lm_head" in n or "embed" in n for n in states)

    # quant-llm's with_kv_cache gives the same quantizers, formats and amaxes
    from quant_llm import with_kv_cache

    other = make_tiny_llama()
    mtq.quantize(
        other,
        with_kv_cache({**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"}, mtq.FP8_KV_CFG),
        lambda m: [m(b) for b in batches],
    )
    assert _states(other) == states


def test_kv_config_after_disable_all_quantizes_the_kv_cache_alone() -> None:
    batches = _llama_batches()
    model = make_tiny_llama()
    config = {"quant_cfg": [*_base_disable_all, *mtq.FP8_KV_CFG["quant_cfg"]]}
    mtq.quantize(model, config, lambda m: [m(b) for b in batches])
    assert {n.rsplit(".", 1)[1] for n in _states(model)} == {"k_bmm_quantizer", "v_bmm_quantizer"}


def test_update_quant_cfg_with_kv_cache_quant_keeps_the_preset_enabled() -> None:
    out = mtq.update_quant_cfg_with_kv_cache_quant(
        {**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"}, mtq.FP8_KV_CFG["quant_cfg"]
    )
    model = make_tiny_llama()
    batches = _llama_batches()
    mtq.quantize(model, out, lambda m: [m(b) for b in batches])
    states = _states(model)
    assert "model.layers.0.self_attn.q_proj.weight_quantizer" in states
    assert "model.layers.0.self_attn.k_bmm_quantizer" in states

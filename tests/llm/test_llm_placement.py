"""Quantizer placement on each Hugging Face family: which modules get quantizers, by name and count."""

from __future__ import annotations

import copy

import pytest
import torch

import quant_core as mtq
from quant_core.conversion import iter_tensor_quantizers
from quant_llm import with_kv_cache
from quant_llm.testing.tiny_models import FAMILIES, tiny_model

_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj"]
_GATED_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# family -> (layer prefix, attention module, linear layers inside one layer, extra linears outside layers)
LAYOUT = {
    "llama": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER] + _GATED_MLP, []),
    "mistral": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER] + _GATED_MLP, []),
    "qwen2": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER] + _GATED_MLP, []),
    "qwen3": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER] + _GATED_MLP, []),
    "gemma": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER] + _GATED_MLP, []),
    "phi": (
        "model.layers",
        "self_attn",
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        ],
        [],
    ),
    "gpt2": ("transformer.h", "attn", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], []),
    "bert": (
        "encoder.layer",
        "attention.self",
        [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
        ["pooler.dense"],
    ),
    "mixtral": ("model.layers", "self_attn", [f"self_attn.{n}" for n in _DECODER], []),
}
NUM_EXPERTS = 4
FP8_WITH_KV = with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)


def _expected(family: str, layers: int) -> tuple[set[str], set[str]]:
    prefix, attention, linears, extra = LAYOUT[family]
    modules = [f"{prefix}.{i}.{name}" for i in range(layers) for name in linears] + extra
    linear_quantizers = {
        f"{m}.{q}" for m in modules for q in ("input_quantizer", "weight_quantizer")
    }
    if family == "mixtral":  # per expert, under ModelOpt's names
        linear_quantizers |= {
            f"{prefix}.{i}.mlp.experts.{proj}_{q}_quantizers.{e}"
            for i in range(layers)
            for proj in ("gate_up_proj", "down_proj")
            for q in ("input", "weight")
            for e in range(NUM_EXPERTS)
        }
    kv = {
        f"{prefix}.{i}.{attention}.{q}"
        for i in range(layers)
        for q in ("k_bmm_quantizer", "v_bmm_quantizer")
    }
    return linear_quantizers, kv


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_with_kv_cache_places_exactly_the_expected_quantizers(family, forward_loop):
    model = tiny_model(family)
    mtq.quantize(model, FP8_WITH_KV, forward_loop)
    enabled = {name: q for name, q in iter_tensor_quantizers(model) if q.is_enabled}
    linear_expected, kv_expected = _expected(family, model.config.num_hidden_layers)
    assert {n for n in enabled if "_bmm_" not in n} == linear_expected
    assert {n for n in enabled if "_bmm_" in n} == kv_expected
    per_layer = len(LAYOUT[family][2]) + (2 * NUM_EXPERTS if family == "mixtral" else 0)
    assert len(enabled) == model.config.num_hidden_layers * (2 * per_layer + 2) + 2 * len(
        LAYOUT[family][3]
    )
    # Everything that is enabled is FP8 E4M3 and calibrated with a real (positive, finite) amax.
    for name, q in enabled.items():
        assert q.num_bits == (4, 3), name
        assert q.amax is not None and torch.isfinite(q.amax).all() and (q.amax > 0).all(), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_disabled_quantizers_leave_outputs_bit_identical(family, attn, calib_batches):
    """Conversion alone (KV dispatch through "quant_kv", Conv1D transposition, fused experts) changes nothing."""
    model = tiny_model(family, attn)
    reference = copy.deepcopy(model)
    mtq.quantize(model, FP8_WITH_KV, None)
    mtq.disable_quantizer(model, "*")
    batch = calib_batches[0]
    with torch.no_grad():
        expected = reference(**batch)[0]
        got = model(**batch)[0]
    # Fused experts run the routed tokens one expert at a time, as transformers' eager experts do.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if family == "mixtral" else 0)


def test_default_exclusions_keep_lm_head_and_router_unquantized_and_config_can_override(
    forward_loop,
):
    model = tiny_model("mixtral")
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    assert not model.lm_head.weight_quantizer.is_enabled
    assert not model.lm_head.input_quantizer.is_enabled
    router = model.model.layers[0].mlp.gate
    assert not any(True for _ in router.children()), "the router must not be converted"

    override = mtq.FP8_DEFAULT_CFG.copy()
    override["quant_cfg"] = {
        **override["quant_cfg"],
        "lm_head.*": {"num_bits": (4, 3), "axis": None},
    }
    model = tiny_model("mixtral")
    mtq.quantize(model, override, forward_loop)
    assert (
        model.lm_head.weight_quantizer.is_enabled
        and model.lm_head.weight_quantizer.amax is not None
    )


def test_smoothquant_reaches_gpt2_conv1d_and_every_routed_expert(forward_loop):
    """quant-core's algorithms select nn.Linear layers; Conv1D and expert projections qualify once converted."""
    gpt2 = tiny_model("gpt2")
    mtq.quantize(gpt2, mtq.INT8_SMOOTHQUANT_CFG, forward_loop)
    for block in gpt2.transformer.h:
        for layer in (block.attn.c_proj, block.mlp.c_proj):
            assert layer.input_quantizer.pre_quant_scale is not None
        # c_attn and c_fc read ln_1 / ln_2 (pre-norm): their scales were folded into the norms
        for layer, norm in ((block.attn.c_attn, block.ln_1), (block.mlp.c_fc, block.ln_2)):
            assert layer.input_quantizer.pre_quant_scale is None
            assert not torch.equal(norm.weight, torch.ones_like(norm.weight))

    mixtral = tiny_model("mixtral")
    mtq.quantize(mixtral, mtq.INT8_SMOOTHQUANT_CFG, forward_loop)
    routed = 0
    for layer in mixtral.model.layers:
        for proj in layer.mlp.experts.quant_up_proj:
            if proj.routed_tokens:
                routed += 1
                assert proj.input_quantizer.pre_quant_scale is not None
    assert routed >= 4

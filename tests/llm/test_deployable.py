"""Input groups recorded during calibration, and the model left deployable (quant_core.deployable)."""

from __future__ import annotations

import pytest
import torch

import quant_core as mtq

pytest.importorskip("transformers")
quant_llm = pytest.importorskip("quant_llm")
from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

BATCHES = random_token_batches(batches=2, batch_size=2, seq_len=16)


def _loop(model: torch.nn.Module) -> None:
    for batch in BATCHES:
        model(**batch)


def _quantized(config: dict, family: str = "llama") -> torch.nn.Module:
    model = tiny_model(family, hidden_size=128, intermediate_size=256)
    mtq.quantize(model, config, _loop)
    return model


def _with_pqs(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if getattr(getattr(m, "input_quantizer", None), "pre_quant_scale", None) is not None
    ]


def test_groups_are_the_fused_projections_with_their_norms_and_survive_save_restore(tmp_path):
    model = _quantized({**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"})
    groups = {g.members: g.producer for g in mtq.input_groups(model) if len(g.members) > 1}
    expected = {}
    for i in range(2):
        layer = f"model.layers.{i}"
        qkv = tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv")
        expected[qkv] = f"{layer}.input_layernorm"
        expected[(f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj")] = (
            f"{layer}.post_attention_layernorm"
        )
    assert groups == expected
    mtq.save(model, tmp_path / "q.safetensors")
    restored = mtq.restore(
        tiny_model("llama", hidden_size=128, intermediate_size=256), tmp_path / "q.safetensors"
    )
    assert mtq.input_groups(restored) == mtq.input_groups(model)


def test_fused_layers_share_the_largest_input_and_weight_amax():
    model = _quantized({**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"})
    attn = model.model.layers[1].self_attn
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    largest = max(m.weight.detach().abs().max() for m in qkv)  # max calibration of each alone
    assert len({m.weight.detach().abs().max().item() for m in qkv}) == 3
    for m in qkv:
        assert m.weight_quantizer.amax.reshape(()) == largest
        assert torch.equal(m.input_quantizer.amax, qkv[0].input_quantizer.amax)
    assert not mtq.make_deployable(model).changed  # calibration left nothing to do


def test_keys_and_values_share_one_cache_amax():
    model = _quantized(quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG))
    for layer in model.model.layers:
        k, v = layer.self_attn.k_bmm_quantizer.amax, layer.self_attn.v_bmm_quantizer.amax
        assert torch.equal(k, v) and k.item() > 0


@pytest.mark.parametrize(
    "name", ["INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG", "NVFP4_AWQ_LITE_CFG", "W4A8_AWQ_BETA_CFG"]
)
def test_pre_quant_scales_are_folded_without_changing_the_outputs_and_a_second_call_is_a_no_op(
    name,
):
    model = _quantized(getattr(mtq, name))
    assert _with_pqs(model) == []
    assert not mtq.make_deployable(model).changed


def test_folding_into_a_norm_keeps_the_outputs():
    """An exact fold: norm(x) · s through the norm's weight, against the unfolded model."""
    model = _quantized(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            s = torch.rand(128, generator=gen) + 0.5
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.weight.mul_(s)
                m.input_quantizer.pre_quant_scale = 1.0 / s
                m.weight_quantizer.amax = None  # re-derived from the scaled weight below
        for m in model.modules():
            if hasattr(m, "weight_quantizer") and m.weight_quantizer.amax is None:
                m.weight_quantizer.calibrate_from(m.weight)
        ids = BATCHES[0]["input_ids"]
        before = model(ids).logits.double()
        report = mtq.make_deployable(model)
        after = model(ids).logits.double()
    assert sorted(report.into_norms) == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
    ]
    assert report.resmoothed == [] and _with_pqs(model) == []
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_post_norm_blocks_keep_their_scales():
    """BERT's LayerNorm output is also the residual stream: scaling it would change the model."""
    model = _quantized(mtq.INT8_SMOOTHQUANT_CFG, family="bert")
    groups = mtq.input_groups(model)
    assert groups and all(g.producer is None for g in groups)
    assert len(_with_pqs(model)) == sum(len(g.members) for g in groups)
    norms = [m for n, m in model.named_modules() if n.endswith("LayerNorm")]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)  # untouched


def test_calibration_without_data_records_groups_from_the_dummy_inputs():
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    mtq.quantize(model, mtq.W4A16_NVFP4_CFG)  # weight only: no forward_loop
    assert any(len(g.members) == 3 for g in mtq.input_groups(model))
    attn = model.model.layers[0].self_attn
    amaxes = [m.weight_quantizer.amax.reshape(()) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert amaxes[0] == amaxes[1] == amaxes[2]


def test_moe_experts_share_one_input_amax_but_keep_their_weight_scales():
    model = tiny_model("mixtral", hidden_size=128, intermediate_size=256)
    mtq.quantize(model, {**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"}, _loop)
    experts = model.model.layers[0].mlp.experts
    inputs = [p.input_quantizer.amax for p in experts.quant_up_proj]
    weights = {p.weight_quantizer.amax.item() for p in experts.quant_up_proj}
    assert all(torch.equal(a, inputs[0]) for a in inputs) and inputs[0].item() > 0
    assert len(weights) == len(experts.quant_up_proj)  # per expert, not shared


def test_exporters_refuse_a_model_made_undeployable_by_hand(tmp_path):
    from quant_export import UnsupportedFormatError, export_hf_checkpoint

    model = _quantized({**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"})
    attn = model.model.layers[0].self_attn
    attn.k_proj.input_quantizer.amax = attn.k_proj.input_quantizer.amax / 2
    assert mtq.deployment_mismatches(model) == [
        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
        "model.layers.0.self_attn.v_proj: different input amaxes on one input"
    ]
    with pytest.raises(UnsupportedFormatError, match=r"different input amaxes.*make_deployable"):
        export_hf_checkpoint(model, tmp_path / "x")
    assert mtq.make_deployable(model).shared
    export_hf_checkpoint(model, tmp_path / "x")

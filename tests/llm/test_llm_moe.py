"""MoE: every expert of transformers' fused experts gets quantizers and a calibrated amax."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quant_core as mtq
import quant_core.model_quant as model_quant
from quant_core.deployable import DeployReport
from quant_llm import all_experts_forward_loop, experts_without_tokens
from quant_llm.testing.tiny_models import tiny_model

NUM_EXPERTS = 4


class TwoExpertRouter(nn.Module):
    """Sends every token to experts 0 and 1 only (weights 0.7 / 0.3), so experts 2 and 3 see nothing."""

    def forward(self, hidden_states: torch.Tensor):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        index = torch.tensor([[0, 1]]).expand(tokens, 2)
        weights = torch.tensor([[0.7, 0.3]]).expand(tokens, 2)
        return torch.zeros(tokens, NUM_EXPERTS), weights, index


def _mixtral_with_idle_experts() -> nn.Module:
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = TwoExpertRouter()
    return model


def _expert_inputs(model: nn.Module, batches) -> dict[int, float]:
    """Max |hidden state| entering each layer's experts, recorded on the unquantized model."""
    seen: dict[int, float] = {}
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(
                i, max(seen.get(i, 0.0), args[0].abs().max().item())
            )
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return seen


def test_experts_without_routed_tokens_are_reported_and_weights_still_calibrated(forward_loop):
    model = _mixtral_with_idle_experts()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    assert experts_without_tokens(model) == {
        f"model.layers.{i}.mlp.experts": [2, 3] for i in range(2)
    }
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for e in range(NUM_EXPERTS):
            for proj, param in (
                (experts.quant_up_proj[e], experts.gate_up_proj),
                (experts.quant_down_proj[e], experts.down_proj),
            ):
                assert proj.weight_quantizer.amax.item() == param[e].abs().max().item()
        assert experts.quant_up_proj[0].input_quantizer.amax is not None
        assert (
            experts.quant_up_proj[2].input_quantizer.amax is None
        )  # no token: nothing to calibrate from


def test_calibrating_through_all_experts_gives_every_expert_the_real_input_amax(
    calib_batches, forward_loop, monkeypatch
):
    model = _mixtral_with_idle_experts()
    reference = copy.deepcopy(model)
    expected = _expert_inputs(reference, calib_batches)
    with torch.no_grad():
        ref_logits = reference(**calib_batches[0]).logits

    # Activations only, so the hidden states during calibration are exactly the fp32 ones.
    config = mtq.FP8_DEFAULT_CFG.copy()
    config["quant_cfg"]["*weight_quantizer"] = {"enable": False}
    with monkeypatch.context() as patch:  # first the statistics each expert collected
        patch.setattr(model_quant, "make_deployable", lambda *_a, **_k: DeployReport())
        mtq.quantize(model, config, all_experts_forward_loop(forward_loop))
    assert experts_without_tokens(model) == {
        f"model.layers.{i}.mlp.experts": [2, 3] for i in range(2)
    }
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for e in range(NUM_EXPERTS):
            # Every expert saw every token: its gate/up input amax is the max over all tokens.
            assert experts.quant_up_proj[e].input_quantizer.amax.item() == pytest.approx(
                expected[i], rel=1e-6
            )
            down_amax = experts.quant_down_proj[e].input_quantizer.amax
            assert down_amax is not None and down_amax.item() > 0
        # Idle experts hold their own statistics (their weights differ from the routed ones).
        downs = {
            round(experts.quant_down_proj[e].input_quantizer.amax.item(), 6)
            for e in range(NUM_EXPERTS)
        }
        assert len(downs) == NUM_EXPERTS
    # then calibration's last step: engines run the experts with one input scale, the largest
    largest = {
        i: max(p.input_quantizer.amax for p in layer.mlp.experts.quant_down_proj)
        for i, layer in enumerate(model.model.layers)
    }
    mtq.make_deployable(model)
    for i, layer in enumerate(model.model.layers):
        for p in layer.mlp.experts.quant_down_proj:
            assert torch.equal(p.input_quantizer.amax, largest[i])

    # Routing of the outputs was not changed by the all-experts calibration pass.
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        torch.testing.assert_close(model(**calib_batches[0]).logits, ref_logits, rtol=0, atol=1e-6)


def test_fused_expert_weights_keep_their_parameters_and_fold_in_place(forward_loop):
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    param = experts.gate_up_proj
    keys = set(model.state_dict())
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    assert experts.gate_up_proj is param
    assert {k for k in model.state_dict() if "quantizer" not in k} == keys
    w_amax = experts.quant_up_proj[1].weight_quantizer.amax.item()
    original = param[1].detach().clone()
    experts.quant_up_proj[1].fold_weight()
    scale = w_amax / 448.0
    expected = (original / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(param[1].detach(), expected, rtol=0, atol=0)
    assert not experts.quant_up_proj[1].weight_quantizer.is_enabled


def test_force_eager_experts_impl_on_the_fly_sets_eager_only_for_moe_models():
    """ModelOpt 0.47's helper: fused-experts models get ``_experts_implementation = "eager"``,
    nested sub-configs too; models without experts are left alone. Quantized experts' outputs do
    not depend on the setting."""
    from quant_core.plugins.huggingface import force_eager_experts_impl_on_the_fly

    moe = tiny_model("mixtral")
    moe.config._experts_implementation = "grouped_mm"
    moe.config.text_config = copy.deepcopy(moe.config)  # a nested config, as in multimodal models
    force_eager_experts_impl_on_the_fly(moe)
    assert moe.config._experts_implementation == "eager"
    assert moe.config.text_config._experts_implementation == "eager"

    dense = tiny_model("llama")
    dense.config._experts_implementation = "grouped_mm"
    force_eager_experts_impl_on_the_fly(dense)
    assert dense.config._experts_implementation == "grouped_mm"

    model = tiny_model("mixtral")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG.copy() | {"algorithm": "max"}, lambda m: m(ids))
    with torch.no_grad():
        before = model(ids).logits
        force_eager_experts_impl_on_the_fly(model)
        assert torch.equal(model(ids).logits, before)

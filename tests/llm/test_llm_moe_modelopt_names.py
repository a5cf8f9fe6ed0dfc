"""Fused MoE experts under ModelOpt 0.47's names and detection (issue #31 item 4).

ModelOpt quantizes any module with ``num_experts`` and 3-D ``gate_up_proj`` / ``down_proj``
parameters, keeps per-expert weight quantizers in ``nn.ModuleList`` s named
``gate_up_proj_weight_quantizers`` / ``down_proj_weight_quantizers``, addresses input quantizers as
``gate_up_proj_input_quantizer`` / ``down_proj_input_quantizer``, and lets the singular wildcards
(``*weight_quantizer``, ``*gate_up_proj_weight_quantizer``) select the per-expert entries.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
from quant_core.conversion import iter_tensor_quantizers
from quant_llm.hf_moe import QuantFusedExperts, fused_experts_layout
from quant_llm.testing.tiny_models import tiny_model

E, H, INTER = 3, 8, 6


class ToyExperts(nn.Module):
    """Not a transformers class: 3-D fused expert weights and its own forward (one expert per token)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        gen = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * INTER, H, generator=gen))
        self.down_proj = nn.Parameter(torch.randn(E, H, INTER, generator=gen) / 3)
        self.mix = nn.Linear(H, H)  # an ordinary linear inside: its F.linear is not an expert's
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(H, H, generator=gen) / 3)
            self.mix.bias.copy_(torch.randn(H, generator=gen) / 10)

    def forward(self, x: torch.Tensor, expert_of_token: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            idx = torch.nonzero(expert_of_token == e).squeeze(-1)
            if idx.numel() == 0:
                continue
            gate, up = F.linear(x[idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            out[idx] = F.linear(F.silu(gate) * up, self.down_proj[e])
        return self.mix(out)


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = ToyExperts()

    def forward(self, x: torch.Tensor, expert_of_token: torch.Tensor) -> torch.Tensor:
        return self.experts(x, expert_of_token)


def _toy_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(10, H, generator=gen), torch.arange(10) % E),
        (torch.randn(7, H, generator=gen) * 2, (torch.arange(7) + 1) % E),
    ]


INT8_CFG = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ],
    "algorithm": "max",
}


def _fq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """INT8 fake quantization in float64 (the reference)."""
    amax = amax.double()
    return torch.clamp(torch.round(x * 127 / amax), -128, 127) * amax / 127


def test_a_module_with_3d_expert_weights_that_is_not_a_transformers_class_is_quantized():
    model = ToyModel()
    batches = _toy_batches()
    mtq.quantize(model, INT8_CFG, lambda m: [m(*b) for b in batches])
    experts = model.experts
    assert isinstance(experts, QuantFusedExperts)
    assert type(experts).__name__ == "QuantToyExperts"
    assert isinstance(experts.gate_up_proj_weight_quantizers, nn.ModuleList)
    assert len(experts.gate_up_proj_weight_quantizers) == E
    assert len(experts.down_proj_weight_quantizers) == E
    # per expert and per output row: the weight amax is that expert's own slice
    for e in range(E):
        torch.testing.assert_close(
            experts.gate_up_proj_weight_quantizers[e].amax.reshape(-1),
            experts.gate_up_proj[e].detach().abs().amax(dim=1),
        )
        torch.testing.assert_close(
            experts.down_proj_weight_quantizers[e].amax.reshape(-1),
            experts.down_proj[e].detach().abs().amax(dim=1),
        )
    # the ordinary linear inside kept its own quantizers, and saw no expert's weights
    assert experts.mix.weight_quantizer.amax.numel() == H
    # one shared input amax (one engine scale): the largest input any expert saw
    largest = max(x.abs().max() for x, _ in batches)
    assert experts.gate_up_proj_input_quantizer.amax.item() == pytest.approx(largest.item())

    # numerics: every expert's quantizers, against a float64 reference built from their amaxes
    x, route = batches[1]
    with torch.no_grad():
        got = model(x, route)
        ref = torch.zeros(x.shape[0], H, dtype=torch.float64)
        for e in range(E):
            idx = torch.nonzero(route == e).squeeze(-1)
            w1 = _fq(
                experts.gate_up_proj[e].double(),
                experts.gate_up_proj_weight_quantizers[e].amax.reshape(-1, 1),
            )
            xe = _fq(x[idx].double(), experts.gate_up_proj_input_quantizers[e].amax)
            gate, up = (xe @ w1.T).chunk(2, dim=-1)
            h = F.silu(gate) * up
            w2 = _fq(
                experts.down_proj[e].double(),
                experts.down_proj_weight_quantizers[e].amax.reshape(-1, 1),
            )
            ref[idx] = _fq(h, experts.down_proj_input_quantizers[e].amax) @ w2.T
        mix = experts.mix
        w_mix = _fq(mix.weight.double(), mix.weight_quantizer.amax.reshape(-1, 1))
        ref = _fq(ref, mix.input_quantizer.amax) @ w_mix.T + mix.bias.double()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    # and the quantizers matter: the float output differs by much more than that
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        assert (model(x, route).double() - ref).abs().max() > 1e-3


def test_disabled_quantizers_leave_a_generic_experts_module_exact():
    model = ToyModel()
    float_model = copy.deepcopy(model)
    batches = _toy_batches()
    mtq.quantize(model, INT8_CFG, lambda m: [m(*b) for b in batches])
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        for b in batches:
            assert torch.equal(model(*b), float_model(*b))


@pytest.mark.parametrize(
    "module, layout",
    [
        (ToyExperts(), "gate_up_proj"),
        (nn.Linear(4, 4), None),
    ],
)
def test_detection_follows_modelopt(module, layout):
    assert fused_experts_layout(module) == layout


def test_detection_needs_3d_weights_and_num_experts():
    flat = ToyExperts()
    flat.gate_up_proj = nn.Parameter(torch.zeros(2 * INTER, H))  # 2-D: not fused experts
    assert fused_experts_layout(flat) is None
    anonymous = ToyExperts()
    del anonymous.num_experts
    assert fused_experts_layout(anonymous) is None
    no_gate = ToyExperts()
    del no_gate.gate_up_proj
    no_gate.up_proj = nn.Parameter(torch.zeros(E, INTER, H))
    assert fused_experts_layout(no_gate) == "up_proj"


def _mixtral_quantized(entries: list[dict]) -> nn.Module:
    model = tiny_model("mixtral")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)
    )
    mtq.quantize(model, {"quant_cfg": entries, "algorithm": "max"}, lambda m: m(input_ids=ids))
    return model


def _enabled(model: nn.Module) -> set[str]:
    return {n for n, q in iter_tensor_quantizers(model) if q.is_enabled}


def _expert_names(layers: int, experts: int, *suffixes: str) -> set[str]:
    return {
        f"model.layers.{i}.mlp.experts.{s}.{e}"
        for i in range(layers)
        for s in suffixes
        for e in range(experts)
    }


@pytest.mark.parametrize(
    "pattern, selected",
    [
        ("*gate_up_proj_weight_quantizers*", ("gate_up_proj_weight_quantizers",)),
        ("*gate_up_proj_weight_quantizer", ("gate_up_proj_weight_quantizers",)),
        ("*down_proj_input_quantizer", ("down_proj_input_quantizers",)),
        (
            "*experts*input_quantizer",
            ("gate_up_proj_input_quantizers", "down_proj_input_quantizers"),
        ),
        (
            "*.experts.*weight_quantizer",  # ModelOpt's experts-only recipe unit
            ("gate_up_proj_weight_quantizers", "down_proj_weight_quantizers"),
        ),
        ("model.layers.1.mlp.experts.down_proj_weight_quantizer", None),  # one layer, exact name
    ],
)
def test_modelopt_patterns_select_exactly_the_expert_quantizers_they_select_on_modelopt(
    pattern, selected
):
    model = _mixtral_quantized(
        [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": pattern, "cfg": {"num_bits": 8, "axis": None}},
        ]
    )
    layers, experts = model.config.num_hidden_layers, model.config.num_local_experts
    if selected is None:
        expected = {
            f"model.layers.1.mlp.experts.down_proj_weight_quantizers.{e}" for e in range(experts)
        }
    else:
        expected = _expert_names(layers, experts, *selected)
    assert _enabled(model) == expected


def test_expert_quantizers_have_modelopt_attribute_names():
    model = _mixtral_quantized(
        [
            {"quantizer_name": "*", "enable": False},
            {
                "quantizer_name": "*gate_up_proj_input_quantizer",
                "cfg": {"num_bits": (4, 3), "axis": None},
            },
            {
                "quantizer_name": "*gate_up_proj_weight_quantizer",
                "cfg": {"num_bits": (4, 3), "axis": None},
            },
            {"quantizer_name": "*down_proj_input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
            {"quantizer_name": "*down_proj_weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        ]
    )
    experts = model.model.layers[0].mlp.experts
    n = model.config.num_local_experts
    for attr in ("gate_up_proj_weight_quantizers", "down_proj_weight_quantizers"):
        quantizers = getattr(experts, attr)
        assert isinstance(quantizers, nn.ModuleList) and len(quantizers) == n
        assert all(q.amax is not None for q in quantizers)
    assert experts.gate_up_proj_weight_quantizers[0].num_bits == (4, 3)
    assert experts.down_proj_weight_quantizers[0].num_bits == 8
    # ModelOpt's single input quantizers: their calibrated (shared) amax, and writes reach every expert
    gate_up_in = experts.gate_up_proj_input_quantizer
    assert gate_up_in.is_enabled and gate_up_in.num_bits == (4, 3)
    assert gate_up_in.amax is not None and gate_up_in.amax.item() > 0
    experts.down_proj_input_quantizer.disable()
    assert not any(q.is_enabled for q in experts.down_proj_input_quantizers)
    assert all(q.is_enabled for q in experts.gate_up_proj_input_quantizers)
    experts.down_proj_input_quantizers[1].amax = torch.tensor(123.0)
    with pytest.raises(ValueError, match="differ in 'amax'"):
        _ = experts.down_proj_input_quantizer.amax
    with pytest.raises(AttributeError, match="up_proj_input_quantizer"):
        _ = experts.up_proj_input_quantizer
    # no output quantizers on fused experts (as in ModelOpt)
    assert not [n for n, _ in iter_tensor_quantizers(experts) if "output" in n]


class BmmExperts(nn.Module):
    """Fused 3-D expert weights whose forward multiplies them with ``torch.bmm`` (no F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = E
        gen = torch.Generator().manual_seed(2)
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * INTER, generator=gen))
        self.down_proj = nn.Parameter(torch.randn(E, INTER, H, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, tokens, H)
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down_proj)


def test_experts_whose_forward_bypasses_f_linear_are_refused_while_their_quantizers_are_on():
    model = nn.Sequential(BmmExperts())
    x = torch.randn(E, 4, H, generator=torch.Generator().manual_seed(3))
    with pytest.raises(Exception, match=r"ran no F\.linear on an expert's slice"):
        mtq.quantize(model, INT8_CFG, lambda m: m(x))
    excluded = {"quant_cfg": [*INT8_CFG["quant_cfg"], {"quantizer_name": "*", "enable": False}]}
    fresh = nn.Sequential(BmmExperts())
    expected = fresh(x)
    mtq.quantize(fresh, {**excluded, "algorithm": None})
    assert type(fresh[0]).__name__ == "QuantBmmExperts"
    assert torch.equal(fresh(x), expected)  # its quantizers are off: it runs as it was


def test_generic_experts_quantizer_state_restores_onto_a_fresh_module():
    from quant_core.save_restore import quantizer_state, restore_quantizer_state

    model = ToyModel()
    batches = _toy_batches()
    mtq.quantize(model, INT8_CFG, lambda m: [m(*b) for b in batches])
    fresh = ToyModel()
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "quantizer" not in k}, strict=True
    )
    restore_quantizer_state(fresh, quantizer_state(model))
    fresh.load_state_dict(model.state_dict())
    assert type(fresh.experts) is type(model.experts)
    with torch.no_grad():
        for b in batches:
            assert torch.equal(fresh(*b), model(*b))

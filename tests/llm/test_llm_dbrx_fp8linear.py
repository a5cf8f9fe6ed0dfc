"""DBRX experts and transformers' fine-grained FP8 linears (issue #31 item 4).

DBRX: ModelOpt 0.47 gives each expert's gate / up / down projection its own linear layer with
quantizers, named ``mlp.w1_linear.<e>``, ``mlp.v1_linear.<e>``, ``mlp.w2_linear.<e>``.
``FP8Linear``: converted into a linear with ``input_quantizer`` / ``weight_quantizer``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
from quant_core.conversion import iter_tensor_quantizers

transformers = pytest.importorskip("transformers")

EXPERTS, HIDDEN, FFN = 4, 32, 16
INT8_CFG = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*experts*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*experts*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ],
    "algorithm": "max",
}


def _tiny_dbrx() -> nn.Module:
    from transformers import DbrxConfig, DbrxForCausalLM

    torch.manual_seed(0)
    config = DbrxConfig(
        d_model=HIDDEN,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        vocab_size=100,
        ffn_config={"ffn_hidden_size": FFN, "moe_num_experts": EXPERTS, "moe_top_k": 2},
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    )
    model = DbrxForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return model


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _fq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    amax = amax.double()
    return torch.clamp(torch.round(x * 127 / amax), -128, 127) * amax / 127


def test_dbrx_experts_get_modelopt_named_per_expert_linears_and_quantize_exactly():
    model = _tiny_dbrx()
    reference = copy.deepcopy(model)
    keys = set(model.state_dict())
    mtq.quantize(model, INT8_CFG, lambda m: m(input_ids=IDS))
    glu = model.transformer.blocks[0].ffn.experts.mlp
    assert type(glu).__name__ == "QuantDbrxExpertGLU"
    # parameters kept (state_dict keys unchanged apart from the quantizers' buffers)
    assert {k for k in model.state_dict() if "quantizer" not in k} == keys
    enabled = {n for n, q in iter_tensor_quantizers(model) if q.is_enabled}
    assert enabled == {
        f"transformer.blocks.{b}.ffn.experts.mlp.{p}.{e}.{q}"
        for b in range(2)
        for p in ("w1_linear", "v1_linear", "w2_linear")
        for e in range(EXPERTS)
        for q in ("input_quantizer", "weight_quantizer")
    }
    # per expert, per output row: the weight amax is that expert's own slice
    w2 = glu.w2.view(EXPERTS, FFN, HIDDEN)
    for e in range(EXPERTS):
        torch.testing.assert_close(
            glu.w2_linear[e].weight_quantizer.amax.reshape(-1), w2[e].detach().abs().amax(dim=0)
        )

    # numerics of one expert layer against a float64 reference from the quantizers' amaxes
    experts = model.transformer.blocks[0].ffn.experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, HIDDEN, generator=gen)
    top_index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [1, 3]])
    top_weights = torch.rand(5, 2, generator=gen)
    with torch.no_grad():
        got = experts(x[None], top_index, top_weights).reshape(5, HIDDEN)
        ref = torch.zeros(5, HIDDEN, dtype=torch.float64)
        w1 = glu.w1.view(EXPERTS, FFN, HIDDEN).double()
        v1 = glu.v1.view(EXPERTS, FFN, HIDDEN).double()
        for t in range(5):
            for k in range(2):
                e = int(top_index[t, k])
                lin = (glu.w1_linear[e], glu.v1_linear[e], glu.w2_linear[e])
                xin = x[t : t + 1].double()
                gate = (
                    _fq(xin, lin[0].input_quantizer.amax)
                    @ _fq(w1[e], lin[0].weight_quantizer.amax.reshape(-1, 1)).T
                )
                up = (
                    _fq(xin, lin[1].input_quantizer.amax)
                    @ _fq(v1[e], lin[1].weight_quantizer.amax.reshape(-1, 1)).T
                )
                h = F.silu(gate) * up
                down = (
                    _fq(h, lin[2].input_quantizer.amax)
                    @ _fq(w2[e].double().T, lin[2].weight_quantizer.amax.reshape(-1, 1)).T
                )
                ref[t] += down[0] * top_weights[t, k].double()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)

    # with the quantizers off, the model is the original one, bit for bit
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)

    # folding writes expert 1's fake-quantized down weight into its slice of w2
    mtq.enable_quantizer(model, "transformer.blocks.0.ffn.experts.mlp.w2_linear.1.weight_quantizer")
    down = glu.w2_linear[1]
    expected = _fq(down.weight.detach().double(), down.weight_quantizer.amax.reshape(-1, 1))
    down.fold_weight()
    torch.testing.assert_close(w2[1].detach().T.double(), expected, rtol=0, atol=1e-6)
    assert not down.weight_quantizer.is_enabled


def _fp8_linear(block: tuple[int, int] | None) -> nn.Module:
    from transformers.integrations.finegrained_fp8 import FP8Linear

    gen = torch.Generator().manual_seed(0)
    layer = FP8Linear(256, 192, block_size=block)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(192, 256, generator=gen) * 40).to(torch.float8_e4m3fn))
        scale = torch.rand(layer.weight_scale_inv.shape, generator=gen) * 0.01 + 0.001
        layer.weight_scale_inv.copy_(scale)
    return layer


@pytest.mark.parametrize("block", [(128, 128), None])
def test_fp8_linear_is_dequantized_into_a_quantizable_linear(block):
    layer = _fp8_linear(block)
    fp8 = layer.weight.detach().to(torch.float64)
    scale = layer.weight_scale_inv.detach().to(torch.float64)
    if block is not None:  # one scale per 128 x 128 block
        scale = scale.repeat_interleave(128, 0)[:192].repeat_interleave(128, 1)[:, :256]
    expected = (fp8 * scale).to(torch.bfloat16)
    model = nn.Sequential(layer)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    assert type(layer).__name__ == "QuantFP8Linear"
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.detach(), expected)
    assert not hasattr(layer, "weight_scale_inv")
    assert layer.weight_quantizer.is_enabled and layer.input_quantizer.is_enabled
    assert layer.weight_quantizer.amax is not None
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).double(), x.double() @ expected.double().T, rtol=1e-5, atol=1e-5
        )

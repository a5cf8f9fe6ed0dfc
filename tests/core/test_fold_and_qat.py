"""fold_weight keeps outputs exactly; QAT gets straight-through gradients and optional learnable amax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq


@pytest.mark.parametrize(
    "name",
    [
        "INT8_DEFAULT_CFG",
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
        "NVFP4_DEFAULT_CFG",
        "MXFP8_DEFAULT_CFG",
    ],
)
def test_fold_weight_output_equality_on_cnn(name, cnn, images):
    mtq.quantize(cnn, getattr(mtq, name), lambda m: [m(x) for x in images])
    before = [cnn(x) for x in images]
    mtq.fold_weight(cnn)
    assert all(torch.equal(cnn(x), b) for x, b in zip(images, before))
    assert not cnn.conv1.weight_quantizer.is_enabled and not cnn.head.weight_quantizer.is_enabled


def test_fold_weight_applies_weight_pre_quant_scale_once():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    mtq.quantize(nn.Sequential(layer), mtq.INT8_WEIGHT_ONLY_CFG, None)
    layer.weight_quantizer.pre_quant_scale = torch.full((16,), 0.5)
    x = torch.randn(3, 16)
    before = layer(x)
    mtq.fold_weight(nn.Sequential(layer))
    assert torch.equal(layer(x), before) and layer.weight_quantizer.pre_quant_scale is None


def test_qat_gradients_reach_every_weight_through_quantizers(transformer, tokens):
    mtq.quantize(transformer, mtq.NVFP4_DEFAULT_CFG, lambda m: [m(t) for t in tokens])
    transformer(tokens[0]).square().mean().backward()
    for name, p in transformer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learnable_amax_is_trained_by_qat():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    target = x.clone()
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16))
        layer.bias.zero_()
    cfg = {
        "quant_cfg": {
            "*input_quantizer": {"num_bits": 4, "learn_amax": True},
            "*weight_quantizer": {"enable": False},
            "*output_quantizer": {"enable": False},
        },
        "algorithm": "max",
    }
    model = mtq.quantize(nn.Sequential(layer), cfg, lambda m: m(x))
    amax = layer.input_quantizer._amax
    assert isinstance(amax, nn.Parameter)
    start = amax.item()
    loss_before = F.mse_loss(model(x), target).item()
    opt = torch.optim.SGD([amax], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    assert amax.item() < start  # INT4 max calibration over-covers a Gaussian; training clips it
    assert F.mse_loss(model(x), target).item() < loss_before

"""Calibration statistics shared by the algorithms: the Gram matrix and the one-pass weight cache."""

from __future__ import annotations

import copy

import torch
from torch import nn

import quant_core as mtq
import quant_kernels
from quant_core.algorithms.statistics import (
    block_diagonal_gram,
    collect_input_stats,
    upper_gram,
    weights_quantized_once,
)


def test_upper_gram_holds_the_upper_blocks_of_the_float64_gram():
    x = torch.randn(300, 700, generator=torch.Generator().manual_seed(0))
    ref = x.double().T @ x.double()
    g = upper_gram(x, chunk=256).double()
    full = g.triu() + g.triu(1).T
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-3)
    assert torch.all(g[256:, :256] == 0)  # the lower blocks are never computed


def test_block_diagonal_gram_holds_the_diagonal_blocks_of_the_float64_gram():
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(3))
    ref = x.double().T @ x.double()
    g = block_diagonal_gram(x, 128).double()  # blocks of 128, 128 and 44
    mask = torch.zeros(300, 300, dtype=torch.bool)
    for i in (0, 128, 256):
        mask[i : i + 128, i : i + 128] = True
    torch.testing.assert_close(g[mask], ref[mask], rtol=1e-4, atol=1e-3)
    assert torch.all(g[~mask] == 0)


def test_collected_block_gram_matches_the_full_gram_on_its_blocks():
    layer = nn.Linear(96, 8)
    batches = [torch.randn(2, 50, 96, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    full = collect_input_stats({"l": layer}, lambda: [layer(b) for b in batches], gram=True)
    blocks = collect_input_stats({"l": layer}, lambda: [layer(b) for b in batches], gram=32)
    for i in (0, 32, 64):
        torch.testing.assert_close(
            blocks["l"].gram[i : i + 32, i : i + 32], full["l"].gram[i : i + 32, i : i + 32]
        )
    assert blocks["l"].gram[:32, 32:].abs().sum() == 0


def test_collected_gram_is_the_full_symmetric_input_gram():
    layer = nn.Linear(600, 8)
    batches = [torch.randn(2, 50, 600, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    stats = collect_input_stats({"l": layer}, lambda: [layer(b) for b in batches], gram=True)
    x = torch.cat([b.reshape(-1, 600) for b in batches]).double()
    torch.testing.assert_close(stats["l"].gram.double(), x.T @ x, rtol=1e-4, atol=1e-3)


def _int4_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    mtq.quantize(model, copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)), None)
    return model


def test_weights_quantized_once_gives_the_same_outputs_with_one_quantization_per_weight(
    monkeypatch,
):
    model = _int4_model()
    batches = [torch.randn(5, 64, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        ref = [model(b) for b in batches]
    calls = []
    original = quant_kernels.fake_quantize_format

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(quant_kernels, "fake_quantize_format", counting)
    with torch.no_grad(), weights_quantized_once(model):
        got = [model(b) for b in batches]
    assert len(calls) == 2  # two weight layers, four batches
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g)
    assert "forward" not in vars(model[0].weight_quantizer)  # nothing left behind


def test_weights_quantized_once_requantizes_a_weight_changed_in_place():
    model = _int4_model()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), weights_quantized_once(model):
        model(x)
        model[0].weight.mul_(0.5)
        got = model(x)
    with torch.no_grad():
        assert torch.equal(got, model(x))

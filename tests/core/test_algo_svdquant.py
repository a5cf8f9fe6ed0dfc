"""SVDQuant: the low-rank branch absorbs outliers so the quantized layer errs less than plain rounding."""

from __future__ import annotations

import copy

import torch
from algo_refs import int_quant
from torch import nn

import quant_core as mtq
from quant_core.algorithms.svdquant import low_rank_split, svdquant_search
from quant_core.algorithms.weights import BlockFormat


def weight_with_outliers(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    u = torch.randn(rows, 2, generator=gen, dtype=torch.float64)
    v = torch.zeros(2, cols, dtype=torch.float64)
    v[0, 3], v[1, 40] = 25.0, -30.0  # two outlier input channels, a rank-2 structure
    return w + u @ v


def test_low_rank_split_reconstructs_and_beats_plain_quantization():
    w = weight_with_outliers(64, 128, seed=0)
    fmt = BlockFormat(int_quant(4), block=32)
    lora_a, lora_b, res_q = low_rank_split(w, fmt, rank=4)
    assert lora_a.shape == (4, 128) and lora_b.shape == (64, 4)
    torch.testing.assert_close(fmt(res_q), res_q, rtol=0, atol=1e-12)  # residual on the grid
    err_svd = float((res_q + lora_b @ lora_a - w).square().sum())
    err_plain = float((fmt(w) - w).square().sum())
    assert err_svd < 0.5 * err_plain


def test_svdquant_search_output_error_below_plain_quantization():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=gen, dtype=torch.float64)
    x[:, 7] *= 15.0
    w = weight_with_outliers(64, 128, seed=2)
    fmt = BlockFormat(int_quant(4), block=32)
    s, lora_a, lora_b, res_q = svdquant_search(w, x.abs().mean(0), x.T @ x, fmt, rank=4)
    y = x @ w.T
    err_svd = float(((x / s) @ (res_q + lora_b @ lora_a).T - y).square().sum())
    err_plain = float((x @ fmt(w).T - y).square().sum())
    assert err_svd < 0.5 * err_plain


def test_svdquant_model_error_below_plain_nvfp4():
    torch.manual_seed(17)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(weight_with_outliers(64, 128, seed=18).float() * 0.05)
    gen = torch.Generator().manual_seed(19)
    data = [torch.randn(64, 128, generator=gen) for _ in range(2)]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])

    def error(algorithm):
        m = copy.deepcopy(model)
        config = copy.deepcopy(dict(mtq.W4A16_NVFP4_CFG))
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return m, float((torch.cat([m(b) for b in data]) - ref).square().sum())

    _, plain = error("max")
    m, svd = error({"method": "svdquant", "lowrank": 4})
    assert m[0].svdquant_lora_a.shape == (4, 128)
    assert svd < 0.5 * plain


def test_svdquant_with_short_last_block_on_grid_and_below_plain():
    """Block 32 on 40 columns (blocks of 32 and 8): residual on each block's grid, error < plain."""
    quant = int_quant(4)

    def blockwise(w):  # independent float64 max-calibrated block quantization by slicing
        out = torch.empty_like(w)
        for s in range(0, w.shape[-1], 32):
            block = w[..., s : s + 32]
            out[..., s : s + 32] = quant(block, block.abs().amax(-1, keepdim=True))
        return out

    gen = torch.Generator().manual_seed(60)
    x = torch.randn(256, 48, generator=gen, dtype=torch.float64)
    x[:, 3] *= 15.0
    w = weight_with_outliers(32, 48, seed=61)
    fmt = BlockFormat(int_quant(4), block=32)
    s, lora_a, lora_b, res_q = svdquant_search(w, x.abs().mean(0), x.T @ x, fmt, rank=4)
    assert lora_a.shape == (4, 48) and lora_b.shape == (32, 4)
    torch.testing.assert_close(blockwise(res_q), res_q, rtol=0, atol=1e-12)
    y = x @ w.T
    err_svd = float(((x / s) @ (res_q + lora_b @ lora_a).T - y).square().sum())
    err_plain = float((x @ blockwise(w).T - y).square().sum())
    assert err_svd < 0.5 * err_plain


def test_svdquant_model_on_input_dim_below_block():
    import copy

    import quant_core as mtq

    torch.manual_seed(62)
    model = torch.nn.Sequential(torch.nn.Linear(96, 32)).eval()
    with torch.no_grad():
        model[0].weight.copy_(weight_with_outliers(32, 96, seed=63).float() * 0.05)
    data = torch.randn(64, 96, generator=torch.Generator().manual_seed(64))
    with torch.no_grad():
        ref = model(data)

    def error(algorithm):
        m = copy.deepcopy(model)
        config = copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: mm(data))
        with torch.no_grad():
            return m, float((m(data) - ref).square().sum())

    _, plain = error("max")
    m, svd = error({"method": "svdquant", "lowrank": 4})
    assert m[0].weight_quantizer.amax.shape == (32, 1)
    assert svd < 0.5 * plain


def test_svdquant_model_saved_and_restored_into_a_fresh_model_is_bit_identical(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    model = copy.deepcopy(fresh)
    data = [torch.randn(32, 128, generator=gen) for _ in range(2)]
    config = {
        **copy.deepcopy(dict(mtq.NVFP4_DEFAULT_CFG)),
        "algorithm": {"method": "svdquant", "lowrank": 4},
    }
    mtq.quantize(model, config, lambda m: [m(b) for b in data])
    a, b = model[0].low_rank_branch
    x = torch.randn(8, 128, generator=gen)
    with torch.no_grad():
        want = model(x)
        # the branch really contributes: without it the output moves
        model[0].set_low_rank_branch(None, None)
        assert not torch.equal(model(x), want)
        model[0].set_low_rank_branch(a, b)
    mtq.save(model, tmp_path / "svd.safetensors")
    restored = mtq.restore(copy.deepcopy(fresh), tmp_path / "svd.safetensors")
    assert torch.equal(restored[0].low_rank_branch[0], a)
    with torch.no_grad():
        assert torch.equal(restored(x), want)

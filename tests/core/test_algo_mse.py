"""MSE amax search: never worse than max calibration, and equal to a brute-force float64 search."""

from __future__ import annotations

import torch

from quant_core.algorithms.mse import BlockFormat, hessian_diag_blocks, mse_amax


def int_quant(bits: int):
    """Independent float reference: symmetric INT with scale amax/qmax, round half to even."""
    qmax = 2 ** (bits - 1) - 1

    def quant(x, amax):
        scale = amax / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax - 1, qmax) * safe
        return torch.where(scale > 0, q, torch.zeros_like(q))

    return quant


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    chi = torch.randn(rows, cols, 3, generator=gen, dtype=torch.float64).square().mean(-1)
    return normal / chi.sqrt()  # Student-t with 3 degrees of freedom


def test_mse_amax_block_error_never_above_max_calibration():
    w = heavy_tailed(32, 128, seed=0)
    fmt = BlockFormat(int_quant(4), block=32)
    blocks = fmt.blocks(w)
    err_max = (fmt(w) - w).square().unflatten(-1, (4, 32)).sum(-1)
    err_mse = (fmt(w, mse_amax(w, fmt)) - w).square().unflatten(-1, (4, 32)).sum(-1)
    assert torch.all(err_mse <= err_max + 1e-12)
    assert err_mse.sum() < 0.9 * err_max.sum()
    assert blocks.shape == (32, 4, 32)


def test_mse_amax_equals_brute_force_search():
    w = heavy_tailed(4, 16, seed=1)
    ratios = torch.linspace(1.0, 0.5, 11, dtype=torch.float64)
    quant = int_quant(4)
    got = mse_amax(w, BlockFormat(quant, block=8), ratios=ratios, chunk_elems=64).squeeze(-1)
    for r in range(4):
        for b in range(2):
            block = w[r, b * 8 : (b + 1) * 8]
            errs = [
                float((quant(block, block.abs().max() * k) - block).square().sum()) for k in ratios
            ]
            best = block.abs().max() * ratios[min(range(len(errs)), key=errs.__getitem__)]
            assert abs(float(got[r, b]) - float(best)) < 1e-12


def test_hessian_weighted_search_lowers_output_error():
    torch.manual_seed(2)
    x = torch.randn(256, 64, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, 64, dtype=torch.float64
    )
    w = heavy_tailed(16, 64, seed=2)
    fmt = BlockFormat(int_quant(4), block=16)
    h = x.T @ x
    amax = mse_amax(w, fmt, hessian=h)
    hb = hessian_diag_blocks(h, 16)
    for b in range(4):
        ref_blocks = h[b * 16 : (b + 1) * 16, b * 16 : (b + 1) * 16]
        assert torch.equal(hb[b], ref_blocks)
    xb = x.unflatten(-1, (4, 16))

    def per_block_out_err(wq):
        d = (wq - w).unflatten(-1, (4, 16))
        return torch.einsum("nbc,rbc->rbn", xb, d).square().sum(-1)

    assert torch.all(per_block_out_err(fmt(w, amax)) <= per_block_out_err(fmt(w)) + 1e-9)


def test_mse_algorithm_lowers_weight_error_of_every_layer():
    import copy

    import quant_core as mtq

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64)).eval()
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(heavy_tailed(*layer.weight.shape, seed=4).float())
    data = [torch.randn(32, 256)]

    def weight_errors(algorithm):
        m = copy.deepcopy(model)
        config = copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return [
                float((layer.weight_quantizer(layer.weight) - layer.weight).square().sum())
                for layer in m
            ]

    for mse, rtn in zip(weight_errors("mse"), weight_errors("max")):
        assert mse < rtn

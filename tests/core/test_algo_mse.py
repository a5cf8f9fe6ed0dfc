"""MSE amax search: never worse than max calibration, and equal to a brute-force float64 search."""

from __future__ import annotations

import torch
from algo_refs import int_quant

from quant_core.algorithms.output_error import hessian_diag_blocks, mse_amax
from quant_core.algorithms.weights import BlockFormat


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


# ----- block sizes that do not divide the input dim: zero-padded, the last block short ----------
def block_slices(cols: int, block: int) -> list[slice]:
    return [slice(s, s + block) for s in range(0, cols, block)]


def test_mse_amax_with_short_last_block_equals_brute_force_search():
    w = heavy_tailed(4, 20, seed=40)  # blocks of 8, 8 and 4 columns
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(64, 20, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 20)
    h = x.T @ x
    ratios = torch.linspace(1.0, 0.5, 11, dtype=torch.float64)
    quant = int_quant(4)
    fmt = BlockFormat(quant, block=8)
    hb = hessian_diag_blocks(h, 8)
    assert hb.shape == (3, 8, 8)
    assert torch.equal(hb[2, :4, :4], h[16:, 16:]) and not hb[2, 4:].any()
    weighting = {
        "plain": ({}, lambda cols: torch.eye(len(range(20)[cols]), dtype=torch.float64)),
        "gram": ({"hessian": h}, lambda cols: h[cols, cols]),
        "gram diagonal": ({"hessian_diag": h.diagonal()}, lambda cols: h[cols, cols].diag().diag()),
    }
    for kwargs, block_gram in weighting.values():
        got = mse_amax(w, fmt, ratios=ratios, chunk_elems=64, **kwargs).squeeze(-1)
        assert got.shape == (4, 3)
        for r in range(4):
            for b, cols in enumerate(block_slices(20, 8)):
                block = w[r, cols]
                hbb = block_gram(cols)
                errs = []
                for k in ratios:
                    d = quant(block, block.abs().max() * k) - block
                    errs.append(float(d @ hbb @ d))
                best = block.abs().max() * ratios[min(range(len(errs)), key=errs.__getitem__)]
                assert abs(float(got[r, b]) - float(best)) < 1e-12


def test_mse_algorithm_on_input_dims_not_multiple_of_block():
    """Linear(576, 64) and Linear(96, 32), INT4 block 128: per-block error <= max calibration's."""
    import copy

    import quant_core as mtq

    quant = int_quant(4)
    for cin, cout in ((576, 64), (96, 32)):
        torch.manual_seed(42)
        model = torch.nn.Sequential(torch.nn.Linear(cin, cout)).eval()
        with torch.no_grad():
            model[0].weight.copy_(heavy_tailed(cout, cin, seed=43).float())
        w = model[0].weight.detach().double()
        config = copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
        config["algorithm"] = "mse"
        x = torch.randn(8, cin)
        mtq.quantize(model, config, lambda m, x=x: m(x))
        amax = model[0].weight_quantizer.amax.double()
        assert amax.shape == (cout, -(-cin // 128))
        with torch.no_grad():
            wq = model[0].weight_quantizer(model[0].weight).double()
        for b, cols in enumerate(block_slices(cin, 128)):
            block = w[:, cols]
            ref = quant(block, amax[:, b : b + 1])  # on the INT4 grid of this (short) block
            torch.testing.assert_close(wq[:, cols], ref, rtol=1e-5, atol=1e-6)
            rtn = quant(block, block.abs().amax(-1, keepdim=True))
            err_mse = (ref - block).square().sum(-1)
            err_rtn = (rtn - block).square().sum(-1)
            assert torch.all(err_mse <= err_rtn * (1 + 1e-6) + 1e-9)
            assert err_mse.sum() < err_rtn.sum()


def test_kernel_format_grid_path_equals_the_kernels_bit_for_bit():
    """The searches' inlined INT/FP grid arithmetic gives exactly quant_kernels.fake_quantize's result."""
    import quant_kernels as qk
    from quant_core.algorithms.weights import kernel_format
    from quant_core.nn import TensorQuantizer

    gen = torch.Generator().manual_seed(50)
    w = torch.randn(48, 256, generator=gen) * torch.logspace(-3, 2, 48).unsqueeze(1)
    w[3] = 0.0  # zero blocks: zero scale
    for attrs in (
        {"num_bits": 4, "block_sizes": {-1: 128}},
        {"num_bits": 4, "block_sizes": {-1: 64}, "unsigned": True},
        {"num_bits": 8, "axis": 0, "narrow_range": True},
        {"num_bits": 8, "axis": None},
        {"num_bits": (4, 3), "axis": None},
        {"num_bits": (4, 3), "axis": 0},
        {"num_bits": (5, 2), "block_sizes": {-1: 32}},
    ):
        fmt = kernel_format(TensorQuantizer(attrs))
        assert fmt.grid is not None
        for ratio in (1.0, 0.7):
            amax = fmt.amax(w) * ratio
            got = fmt(w, amax)
            kernel_amax = amax.squeeze(-1) if fmt.block else amax.reshape(-1)[:1].reshape(())
            kwargs = {k: v for k, v in attrs.items() if k != "axis"}
            if fmt.block is None and not fmt.per_tensor:
                kernel_amax = amax.reshape(48, 1)
            expected = qk.fake_quantize(w, amax=kernel_amax, **kwargs)
            assert torch.equal(got, expected), (attrs, ratio)
            assert not torch.equal(got, w)

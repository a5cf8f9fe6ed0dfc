"""AWQ: the searched scale and clipping lower the layer's output error against plain rounding."""

from __future__ import annotations

import torch
from algo_refs import block_max, blockwise_ref, int_quant

from quant_core.algorithms.awq import awq_clip_search, awq_scale_search
from quant_core.algorithms.output_error import output_error, scaled_hessian
from quant_core.algorithms.weights import BlockFormat


def salient_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    x[:, ::16] *= 20.0  # salient input channels
    return x


def out_err(x, w, wq):
    return float((x @ (wq - w).T).square().sum())


def test_output_error_equals_direct_computation():
    x = salient_inputs(64, 32, seed=0)
    d = torch.randn(5, 32, dtype=torch.float64)
    assert abs(
        float(output_error(d, x.T @ x)) - out_err(x, torch.zeros_like(d), d)
    ) < 1e-8 * out_err(x, torch.zeros_like(d), d)


def test_awq_scale_lowers_output_error_vs_alpha_zero():
    x = salient_inputs(512, 128, seed=1)
    w = torch.randn(64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fmt = BlockFormat(int_quant(4), block=32)
    alpha, s = awq_scale_search(w, x.abs().mean(0), x.T @ x, fmt)
    rtn = out_err(x, w, fmt(w))  # no scaling: s = 1
    awq = out_err(x / s, w * s, fmt(w * s))  # the layer computes (x / s) Q(W s)^T
    assert alpha >= 0  # a scaling beat no scaling (reported as -1)
    assert awq < 0.8 * rtn


def test_awq_clip_lowers_output_error_and_full_lowers_further():
    x = salient_inputs(512, 128, seed=3)
    w = torch.randn(64, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fmt = BlockFormat(int_quant(4), block=32)
    h = x.T @ x
    rtn = out_err(x, w, fmt(w))
    clipped = out_err(x, w, fmt(w, awq_clip_search(w, h, fmt)))
    assert clipped < rtn
    _, s = awq_scale_search(w, x.abs().mean(0), h, fmt)
    ws = w * s
    amax = awq_clip_search(ws, scaled_hessian(h, s), fmt)
    full = out_err(x / s, ws, fmt(ws, amax))
    assert full <= out_err(x / s, ws, fmt(ws)) + 1e-9
    assert full < clipped


def test_scaled_hessian_is_gram_of_scaled_inputs():
    x = salient_inputs(32, 16, seed=5)
    s = torch.rand(16, dtype=torch.float64) + 0.5
    torch.testing.assert_close(
        scaled_hessian(x.T @ x, s), (x / s).T @ (x / s), rtol=1e-12, atol=1e-10
    )


def _weight_only_error(algorithm, config_name="INT4_BLOCKWISE_WEIGHT_ONLY_CFG"):
    """Output error of a two-layer model with salient input channels after INT4 block-128 quantization."""
    import copy

    import quant_core as mtq

    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64)).eval()
    data = [salient_inputs(128, 256, seed=s).float() for s in (12, 13)]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])
    config = copy.deepcopy(dict(getattr(mtq, config_name)))
    config["algorithm"] = algorithm
    mtq.quantize(model, config, lambda m: [m(b) for b in data])
    with torch.no_grad():
        return float((torch.cat([model(b) for b in data]) - ref).square().sum())


def test_awq_algorithms_lower_model_error_vs_round_to_nearest():
    rtn = _weight_only_error("max")
    for name in ("awq_lite", "awq_clip", "awq_full"):
        assert _weight_only_error(name) < rtn, name
    assert _weight_only_error({"method": "awq_lite", "alpha_step": 0.25}) < rtn


def test_awq_rejects_bad_option():
    import pytest

    with pytest.raises(ValueError, match="alpha_step"):
        _weight_only_error({"method": "awq_lite", "alpha_step": 0.0})


# ----- block sizes that do not divide the input dim: zero-padded, the last block short ----------


def test_relative_weight_mean_with_short_last_block():
    from quant_core.algorithms.awq import relative_weight_mean

    w = torch.randn(8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(30))
    got = relative_weight_mean(w, BlockFormat(int_quant(4), block=16))
    amax = block_max(w, 16).repeat_interleave(16, dim=-1)[:, :40]
    torch.testing.assert_close(got, (w.abs() / amax).mean(0), rtol=1e-12, atol=0)


def test_awq_search_with_short_last_block_beats_alpha_zero_and_rounding():
    x = salient_inputs(512, 96, seed=31)
    w = torch.randn(32, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
    fmt = BlockFormat(int_quant(4), block=64)  # blocks of 64 and 32 columns
    h = x.T @ x

    def err(s):  # the layer computes (x / s) Q(W s)^T; Q by independent slicing
        ws = w * s
        return out_err(x / s, ws, blockwise_ref(ws, block_max(ws, 64), 64))

    _, s = awq_scale_search(w, x.abs().mean(0), h, fmt)
    _, s0 = awq_scale_search(w, x.abs().mean(0), h, fmt, alphas=torch.zeros(1))
    assert s.shape == (96,)
    assert err(s) <= err(s0) * (1 + 1e-9)
    assert err(s) < 0.8 * err(torch.ones(96, dtype=torch.float64))
    amax = awq_clip_search(w, h, fmt).squeeze(-1)
    assert amax.shape == (32, 2)
    assert torch.all(amax <= block_max(w, 64) + 1e-12)
    assert out_err(x, w, blockwise_ref(w, amax, 64)) < out_err(
        x, w, blockwise_ref(w, block_max(w, 64), 64)
    )


def _int4_single_layer(cin, cout, algorithm):
    """Linear(cin, cout) quantized with INT4 block-128 weights by ``algorithm`` on salient inputs."""
    import copy

    import quant_core as mtq

    torch.manual_seed(33)
    model = torch.nn.Sequential(torch.nn.Linear(cin, cout, bias=False)).eval()
    w0 = model[0].weight.detach().double().clone()
    x = salient_inputs(256, cin, seed=34)
    config = copy.deepcopy(dict(mtq.INT4_AWQ_CFG))
    config["algorithm"] = algorithm
    mtq.quantize(model, config, lambda m: m(x.float()))
    return model[0], w0, x


def test_awq_on_input_dims_not_multiple_of_block():
    """Linear(576, 64) and Linear(96, 32), INT4 block 128: weights on each short block's grid, error < RTN."""
    for cin, cout in ((576, 64), (96, 32)):
        nb = -(-cin // 128)
        for algorithm in ("awq_lite", "awq_clip", "awq_full"):
            layer, w0, x = _int4_single_layer(cin, cout, algorithm)
            w = layer.weight.detach().double()  # W s (s = 1 for awq_clip)
            amax = layer.weight_quantizer.amax.double()
            assert amax.shape == (cout, nb), algorithm
            if algorithm == "awq_lite":
                torch.testing.assert_close(amax, block_max(w, 128), rtol=1e-6, atol=0)
            else:
                assert torch.all(amax <= block_max(w, 128) * (1 + 1e-6)), algorithm
            with torch.no_grad():
                wq = layer.weight_quantizer(layer.weight).double()
            ref = blockwise_ref(w, amax, 128)  # on the INT4 grid of each (short) block
            torch.testing.assert_close(wq, ref, rtol=1e-5, atol=1e-6)
            pqs = layer.input_quantizer.pre_quant_scale
            xs = x if pqs is None else x * pqs.double()
            err = float((xs @ ref.T - x @ w0.T).square().sum())  # (x / s) Q(W s)^T vs x W^T
            rtn = out_err(x, w0, blockwise_ref(w0, block_max(w0, 128), 128))
            assert err < rtn, (cin, algorithm)


def test_awq_scale_search_picks_the_least_block_diagonal_error():
    """Brute force in float64: every candidate scored by sum over 128-column blocks of
    d_b^T H_bb d_b (blocks of 32 widened to 128: scoring_block)."""
    from quant_core.algorithms.awq import awq_scales, relative_weight_mean, scoring_block

    x = salient_inputs(512, 256, seed=6)
    w = torch.randn(16, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    fmt = BlockFormat(int_quant(4), block=32)
    assert scoring_block(fmt, 256) == 128 and scoring_block(fmt, 96) == 96
    h = x.T @ x
    alphas = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    alpha, s = awq_scale_search(w, x.abs().mean(0), h, fmt, alphas)
    scaled = awq_scales(x.abs().mean(0), alphas, relative_weight_mean(w, fmt))
    cands = [torch.ones(256, dtype=torch.float64), *scaled]

    def block_diagonal_error(scales):
        d = fmt(w * scales) / scales - w
        return sum(
            float(
                torch.einsum(
                    "ri,ij,rj->", d[:, b : b + 128], h[b : b + 128, b : b + 128], d[:, b : b + 128]
                )
            )
            for b in (0, 128)
        )

    errors = [block_diagonal_error(c) for c in cands]
    best = min(range(len(errors)), key=errors.__getitem__)
    assert torch.equal(s, cands[best])
    assert alpha == (-1.0 if best == 0 else float(alphas[best - 1]))
    assert len(set(errors)) == len(errors)  # the candidates are distinguishable

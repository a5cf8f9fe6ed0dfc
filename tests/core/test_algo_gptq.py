"""GPTQ: error-compensated rounding beats plain rounding and matches the textbook update rule."""

from __future__ import annotations

import torch

from quant_core.algorithms.gptq import gptq_quantize
from quant_core.algorithms.mse import BlockFormat


def int_quant(bits: int):
    """Independent float reference: symmetric INT with scale amax/qmax, round half to even."""
    qmax = 2 ** (bits - 1) - 1

    def quant(x, amax):
        scale = amax / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax - 1, qmax) * safe
        return torch.where(scale > 0, q, torch.zeros_like(q))

    return quant


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols // 4, generator=gen, dtype=torch.float64)
    mix = torch.randn(cols // 4, cols, generator=gen, dtype=torch.float64)
    return base @ mix + 0.1 * torch.randn(n, cols, generator=gen, dtype=torch.float64)


def layer_error(x, w, wq):
    return float((x @ (wq - w).T).square().sum())


def obs_reference(w, h, quant, amax_cols, percdamp):
    """Textbook sequential OBS update with an explicitly maintained inverse Hessian (no Cholesky)."""
    w = w.clone()
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = quant(w[:, i], amax_cols[:, i])
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q


def test_gptq_layer_error_below_round_to_nearest():
    x = correlated_inputs(512, 64, seed=0)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fmt = BlockFormat(int_quant(4), block=16)
    rtn = layer_error(x, w, fmt(w))
    for act_order in (False, True):
        wq, _ = gptq_quantize(w, x.T @ x, fmt, block_size=32, act_order=act_order)
        assert layer_error(x, w, wq) < 0.7 * rtn


def test_gptq_output_lies_on_the_grid_of_its_amax():
    x = correlated_inputs(256, 64, seed=2)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fmt = BlockFormat(int_quant(4), block=16)
    for act_order in (False, True):
        wq, amax = gptq_quantize(w, x.T @ x, fmt, block_size=32, act_order=act_order)
        assert amax.shape == (16, 4, 1)
        torch.testing.assert_close(fmt(wq, amax), wq, rtol=0, atol=1e-12)


def test_gptq_matches_textbook_obs_updates():
    x = correlated_inputs(256, 32, seed=4)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = x.T @ x
    fmt = BlockFormat(int_quant(4), block=8)
    amax = fmt.amax(w)
    wq, _ = gptq_quantize(w, h, fmt, amax=amax, block_size=16, percdamp=0.01)
    ref = obs_reference(w, h, fmt.quant, amax.squeeze(-1).repeat_interleave(8, dim=-1), 0.01)
    torch.testing.assert_close(wq, ref, rtol=0, atol=1e-9)


def test_gptq_batched_equals_one_at_a_time():
    xs = [correlated_inputs(128, 32, seed=s) for s in (6, 7)]
    ws = [
        torch.randn(8, 32, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in (8, 9)
    ]
    fmt = BlockFormat(int_quant(4), block=8)
    hs = torch.stack([x.T @ x for x in xs])
    batched, _ = gptq_quantize(torch.stack(ws), hs, fmt, block_size=16, act_order=True)
    for i in range(2):
        single, _ = gptq_quantize(ws[i], hs[i], fmt, block_size=16, act_order=True)
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-12)


def test_gptq_dead_input_channel_gets_zero_weight():
    x = correlated_inputs(128, 32, seed=10)
    x[:, 5] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    wq, _ = gptq_quantize(w, x.T @ x, BlockFormat(int_quant(8), block=None))
    assert torch.all(wq[:, 5] == 0)


def test_gptq_model_error_below_rtn_and_weights_on_grid():
    import copy

    import quant_core as mtq

    torch.manual_seed(14)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)
    ).eval()
    data = [correlated_inputs(128, 256, seed=s).float() for s in (15, 16)]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])

    def quantized(algorithm):
        m = copy.deepcopy(model)
        config = copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return m, float((torch.cat([m(b) for b in data]) - ref).square().sum())

    _, rtn = quantized("max")
    for options in (
        {"method": "gptq"},
        {"method": "gptq", "act_order": False, "clip_search": False},
    ):
        m, err = quantized(options)
        assert err < rtn, options
        for layer in (m[0], m[2]):
            with torch.no_grad():
                torch.testing.assert_close(
                    layer.weight_quantizer(layer.weight), layer.weight, rtol=0, atol=1e-6
                )

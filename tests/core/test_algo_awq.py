"""AWQ: the searched scale and clipping lower the layer's output error against plain rounding."""

from __future__ import annotations

import torch

from quant_core.algorithms.awq import (
    awq_clip_search,
    awq_scale_search,
    output_error,
    scaled_hessian,
)
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

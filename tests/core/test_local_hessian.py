"""ModelOpt's ``local_hessian`` calibration (``model_calib.local_hessian_calibrate``): each INT4
weight block's amax is the multiplier of max|w_b| whose rounding error d has the least
``d^T H_bb d`` (H = X^T X of the layer's calibration inputs), checked by a float64 brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq

INT4_BLOCK16 = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 16}},
        "*input_quantizer": {"enable": False},
    },
}


def _int4(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = (amax.float() / 7).double()
    return torch.clamp(torch.round(w / scale), -8, 7) * scale


def test_local_hessian_picks_the_least_hessian_weighted_error() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 4, bias=False)
    mix = torch.randn(32, 32) * 0.3 + torch.eye(32)
    data = [torch.randn(64, 32) @ mix for _ in range(2)]
    model = nn.Sequential(layer)
    cfg = {**INT4_BLOCK16, "algorithm": mtq.LocalHessianCalibConfig(step_size=0.25)}
    mtq.quantize(model, cfg, lambda m: [m(x) for x in data])
    amax = model[0].weight_quantizer.amax.double()  # (4, 2)
    x = torch.cat(data).double()
    h = x.T @ x
    w = layer.weight.detach().double()
    ratios = torch.arange(0.25, 4.0 + 1e-9, 0.25, dtype=torch.float64)
    plain_mse_worse = 0  # blocks where the unweighted choice is not the Hessian optimum
    for row in range(4):
        for b in range(2):
            wb = w[row, 16 * b : 16 * b + 16]
            hb = h[16 * b : 16 * b + 16, 16 * b : 16 * b + 16]
            errors, squared = [], []
            for r in ratios:
                d = _int4(wb, (r * wb.abs().max()).float()) - wb
                errors.append(float(d @ hb @ d))
                squared.append(float(d @ d))
            d = _int4(wb, amax[row, b]) - wb
            assert float(d @ hb @ d) <= min(errors) * (1 + 1e-6)
            plain_mse_worse += errors[squared.index(min(squared))] > min(errors) * (1 + 1e-6)
    assert plain_mse_worse >= 1


def test_local_hessian_refuses_what_it_does_not_do() -> None:
    model = nn.Sequential(nn.Linear(32, 4))
    with pytest.raises(ValueError, match="fp8_scale_sweep"):
        mtq.quantize(
            model,
            {**INT4_BLOCK16, "algorithm": {"method": "local_hessian", "fp8_scale_sweep": True}},
            lambda m: m(torch.randn(2, 32)),
        )
    with pytest.raises(ValueError, match="block_size=32"):
        mtq.model_calib.local_hessian_calibrate(
            model, lambda m: m(torch.randn(2, 32)), block_size=32
        )

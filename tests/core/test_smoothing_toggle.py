"""ModelOpt 0.47's ``disable_pre_quant_scale_and_resmooth`` / ``apply_pre_quant_scale_and_smooth``
and max calibration's ``skip_forward_without_activation_calib`` (``model_calib``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.config import MaxCalibConfig, QuantizerAttributeConfig
from quant_core.model_calib import (
    _needs_activation_forward_for_max_calib,
    apply_pre_quant_scale_and_smooth,
    disable_pre_quant_scale_and_resmooth,
    max_calibrate,
)
from quant_core.nn import QuantLinear


def _smoothed(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    w0 = model[0].weight.detach().clone()
    x = torch.randn(64, 16, generator=gen) * torch.linspace(0.1, 8.0, 16)
    mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG, lambda m: m(x))
    return model, w0, x


def test_disable_restores_the_unsmoothed_layer_and_apply_smooths_it_again() -> None:
    model, w0, x = _smoothed()
    layer = model[0]
    p = layer.input_quantizer.pre_quant_scale.double().clone()
    w_smoothed = layer.weight.detach().double().clone()
    amax_smoothed = layer.input_quantizer.amax.clone()
    act_amax = x.double().abs().amax(0)  # the per-channel input amax, computed here in float64

    disable_pre_quant_scale_and_resmooth(layer)
    assert layer.input_quantizer.pre_quant_scale is None
    torch.testing.assert_close(layer.weight.double(), w_smoothed * p, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-5, atol=1e-7)
    assert float(layer.input_quantizer.amax) == pytest.approx(float(act_amax.max()), rel=1e-6)
    ref_w_amax = w0.double().abs().amax(1)  # INT8 weights: per output channel
    torch.testing.assert_close(layer.weight_quantizer.amax.double().flatten(), ref_w_amax)

    apply_pre_quant_scale_and_smooth(layer)  # the kept scale
    torch.testing.assert_close(layer.input_quantizer.pre_quant_scale.double(), p, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.weight.double(), w_smoothed, rtol=1e-5, atol=1e-7)
    ref_amax = (act_amax * p).max()
    assert float(layer.input_quantizer.amax) == pytest.approx(float(ref_amax), rel=1e-6)
    assert float(layer.input_quantizer.amax) == pytest.approx(float(amax_smoothed), rel=1e-6)


def test_apply_takes_a_given_scale_and_refuses_bad_calls() -> None:
    model, w0, x = _smoothed(1)
    layer = model[0]
    with pytest.raises(ValueError, match="already applied"):
        apply_pre_quant_scale_and_smooth(layer)
    disable_pre_quant_scale_and_resmooth(layer, delete_pre_quant_scale=True)
    with pytest.raises(ValueError, match="no pre_quant_scale"):
        apply_pre_quant_scale_and_smooth(layer)
    with pytest.raises(ValueError, match="positive"):
        apply_pre_quant_scale_and_smooth(layer, -torch.ones(16))
    p = torch.linspace(0.5, 2.0, 16)
    apply_pre_quant_scale_and_smooth(layer, p)
    torch.testing.assert_close(layer.weight.double(), w0.double() / p.double(), rtol=1e-6, atol=0)
    ref = (x.double().abs().amax(0) * p.double()).max()
    assert float(layer.input_quantizer.amax) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="quantized Linear"):
        disable_pre_quant_scale_and_resmooth(nn.Linear(4, 4))


def _linear(input_cfg: QuantizerAttributeConfig) -> QuantLinear:
    layer = QuantLinear(16, 8, bias=False)
    layer.weight_quantizer.set_from_attribute_config(QuantizerAttributeConfig(num_bits=8))
    layer.input_quantizer.set_from_attribute_config(input_cfg)
    return layer


@pytest.mark.parametrize(
    ("cfg", "needed"),
    [
        (QuantizerAttributeConfig(num_bits=8), True),
        (QuantizerAttributeConfig(num_bits=8, constant_amax=4.0), False),
        (QuantizerAttributeConfig(num_bits=8, enable=False), False),
        (QuantizerAttributeConfig(num_bits=8, type="dynamic"), False),
        (
            QuantizerAttributeConfig(
                num_bits=(4, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}
            ),
            False,
        ),
    ],
)
def test_needs_activation_forward(cfg: QuantizerAttributeConfig, needed: bool) -> None:
    assert _needs_activation_forward_for_max_calib(_linear(cfg)) is needed


def test_max_calibrate_skips_the_forward_only_when_asked_and_not_needed() -> None:
    assert MaxCalibConfig().skip_forward_without_activation_calib is False
    for skip, cfg, runs in [
        (True, QuantizerAttributeConfig(num_bits=8, constant_amax=4.0), 0),
        (False, QuantizerAttributeConfig(num_bits=8, constant_amax=4.0), 1),
        (True, QuantizerAttributeConfig(num_bits=8), 1),
    ]:
        layer = _linear(cfg)
        w = layer.weight.detach().double()
        calls = []
        max_calibrate(
            layer,
            lambda m, calls=calls: calls.append(m(torch.randn(4, 16))),
            distributed_sync=False,
            skip_forward_without_activation_calib=skip,
        )
        assert len(calls) == runs
        if cfg.constant_amax is not None:
            assert float(layer.input_quantizer.amax) == 4.0
        assert float(layer.weight_quantizer.amax) == pytest.approx(float(w.abs().max()), rel=1e-7)

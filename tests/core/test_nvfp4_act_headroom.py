"""ModelOpt's ``nvfp4_act_headroom`` (``calib/nvfp4_act_headroom.py``): the NVFP4 input global amax
is ``max(rho * anchor, upper)`` of the per-block amax distribution, checked against numpy's exact
percentiles (the calibrator reads log2-histogram bin centres: within half a bin, 2**(80/1024))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.calib import NVFP4ActHeadroomCalibrator
from quant_core.model_calib import nvfp4_act_headroom_calibrate

HALF_BIN = 2 ** (80 / 512 / 2)


def _blocks(x: torch.Tensor) -> np.ndarray:
    return x.abs().reshape(-1, 16).amax(1).numpy().astype(np.float64)


def test_calibrator_anchors_to_a_low_percentile_with_headroom() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * torch.exp(torch.randn(256, 1, generator=gen))
    cal = NVFP4ActHeadroomCalibrator(rho=4096.0, anchor_percentile=5.0, upper_percentile=100.0)
    cal.collect(x)
    blocks = _blocks(x)
    expected = max(4096.0 * np.percentile(blocks, 5.0), blocks.max())
    got = float(cal.compute_amax())
    assert expected / HALF_BIN <= got <= expected * HALF_BIN
    assert got > blocks.max()  # headroom above everything calibration saw


def test_calibrator_without_headroom_warns_and_uses_the_top() -> None:
    x = torch.cat([torch.full((1, 16), 1e-3), torch.full((1, 16), 100.0)])
    cal = NVFP4ActHeadroomCalibrator(rho=2.0, anchor_percentile=1.0, upper_percentile=100.0)
    cal.collect(x)
    with pytest.warns(RuntimeWarning, match="no headroom"):
        assert float(cal.compute_amax()) == 100.0
    with pytest.raises(ValueError, match="rho"):
        NVFP4ActHeadroomCalibrator(rho=30000.0)


def test_algorithm_sets_nvfp4_input_global_amax_and_max_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    data = [torch.randn(8, 64) for _ in range(2)]
    cfg = {
        "quant_cfg": mtq.NVFP4_DEFAULT_CFG["quant_cfg"],
        "algorithm": mtq.NVFP4ActHeadroomCalibConfig(rho=256.0, upper_percentile=100.0),
    }
    mtq.quantize(model, cfg, lambda m: [m(x) for x in data])
    blocks = np.concatenate([_blocks(x) for x in data])
    expected = max(256.0 * np.percentile(blocks, 1.0), blocks.max())
    got = float(model[0].input_quantizer.amax)
    assert expected / HALF_BIN <= got <= expected * HALF_BIN
    # dynamic NVFP4 weights: their amax is the global amax, max |w| under weight_scale_algorithm=max
    assert float(model[0].weight_quantizer.amax) == float(model[0].weight.detach().abs().max())
    # ModelOpt's model_calib entry point runs the same algorithm
    again = nn.Sequential(nn.Linear(64, 32))
    again.load_state_dict(model.state_dict(), strict=False)
    mtq.quantize(again, {"quant_cfg": cfg["quant_cfg"], "algorithm": None})
    nvfp4_act_headroom_calibrate(
        again, lambda m: [m(x) for x in data], rho=256.0, upper_percentile=100.0
    )
    assert float(again[0].input_quantizer.amax) == got


_NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def _two_linears(cfg_input) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*input_quantizer", "cfg": cfg_input},
        ],
        "algorithm": "max",
    }
    return mtq.quantize(model, config, lambda m: m(torch.randn(8, 64)))


def test_headroom_selection_and_swap_target_nvfp4_input_quantizers_only() -> None:
    from quant_core.model_calib import (
        _is_nvfp4_dynamic_input_quantizer,
        _swap_in_nvfp4_act_headroom_calibrators,
    )

    model = _two_linears(_NVFP4)
    q = model[0].input_quantizer
    assert _is_nvfp4_dynamic_input_quantizer("0.input_quantizer", q)
    assert not _is_nvfp4_dynamic_input_quantizer("0.weight_quantizer", q)
    assert not _is_nvfp4_dynamic_input_quantizer("0.input_quantizer", model[0].weight_quantizer)
    swapped = _swap_in_nvfp4_act_headroom_calibrators(
        model, anchor_percentile=5.0, upper_percentile=99.0, rho=1024.0
    )
    assert [s[0] for s in swapped] == [model[0].input_quantizer, model[1].input_quantizer]
    assert isinstance(q._global_calibrator, NVFP4ActHeadroomCalibrator)


def test_headroom_refuses_chained_nvfp4_input_quantizers_before_changing_anything() -> None:
    from quant_core.model_calib import _swap_in_nvfp4_act_headroom_calibrators

    model = _two_linears([_NVFP4, _NVFP4])
    before = [m.input_quantizer[0]._global_calibrator for m in model]
    with pytest.raises(NotImplementedError, match="SequentialQuantizer"):
        _swap_in_nvfp4_act_headroom_calibrators(
            model, anchor_percentile=1.0, upper_percentile=99.99, rho=16384.0
        )
    assert [m.input_quantizer[0]._global_calibrator for m in model] == before
    fp8 = _two_linears([{"num_bits": (4, 3)}, {"num_bits": (4, 3)}])
    swapped = _swap_in_nvfp4_act_headroom_calibrators(
        fp8, anchor_percentile=1.0, upper_percentile=99.99, rho=16384.0
    )
    assert swapped == []

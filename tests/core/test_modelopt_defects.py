"""Defects found running ModelOpt 0.47's documented API on quant (issue #31, item 7), and
``HistogramCalibrator.compute_amax``'s ``start_bin`` / ``stride`` keywords."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.calib import HistogramCalibrator, NVFP4ActHeadroomCalibrator
from quant_core.config import QuantizerAttributeConfig
from quant_core.diagnostics import QuantWarning
from quant_core.nn import SequentialQuantizer, TensorQuantizer


# ----- HistogramCalibrator.compute_amax ----------------------------------------------------------
@pytest.fixture
def histogram() -> HistogramCalibrator:
    calibrator = HistogramCalibrator(num_bins=256)
    calibrator.collect(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    return calibrator


@pytest.mark.parametrize("percentile", [-10, 200, 100.5, -0.01])
def test_percentile_outside_0_100_is_refused(histogram, percentile) -> None:
    with pytest.raises(ValueError, match=f"percentile must be in \\[0, 100\\], got {percentile}"):
        histogram.compute_amax("percentile", percentile=percentile)


def test_percentile_bounds_and_order(histogram) -> None:
    top = histogram.compute_amax("percentile", percentile=100)
    half = histogram.compute_amax("percentile", percentile=50)
    low = histogram.compute_amax("percentile", percentile=0)
    assert low < half < top
    assert float(top) == pytest.approx(histogram._max)  # the last bin's upper edge


def test_mse_start_bin_and_stride_pick_among_those_bin_centres(histogram) -> None:
    width = histogram._max / histogram.num_bins
    amax = float(histogram.compute_amax("mse", start_bin=40, stride=16))
    k = amax / width - 0.5
    assert k == pytest.approx(round(k), abs=1e-3) and round(k) >= 40 and (round(k) - 40) % 16 == 0
    # one candidate left: the last bin's centre
    last = float(histogram.compute_amax("mse", start_bin=histogram.num_bins - 1, stride=1))
    assert last == pytest.approx((histogram.num_bins - 0.5) * width, rel=1e-5)


def test_entropy_start_bin_and_stride(histogram) -> None:
    width = histogram._max / histogram.num_bins
    amax = float(histogram.compute_amax("entropy", start_bin=200, stride=8))
    i = amax / width - 0.5
    assert round(i) >= 200 and (round(i) - 200) % 8 == 0
    with pytest.raises(ValueError, match="start_bin must be at least the 128"):
        histogram.compute_amax("entropy", start_bin=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_bin": 256}, "start_bin must be an int in \\[0, 256\\)"),
        ({"start_bin": -1}, "start_bin"),
        ({"stride": 0}, "stride must be a positive int"),
        ({"stride": 1.5}, "stride"),
    ],
)
def test_bad_search_keywords_are_named(histogram, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        histogram.compute_amax("mse", **kwargs)


# ----- NVFP4ActHeadroomCalibrator on zeros ---------------------------------------------------------
def test_headroom_calibrator_on_all_zero_input_gives_no_amax_and_says_so() -> None:
    calibrator = NVFP4ActHeadroomCalibrator()
    calibrator.collect(torch.zeros(8, 64))
    with pytest.warns(QuantWarning, match="saw only zeros"):
        assert calibrator.compute_amax() is None
    calibrator.collect(torch.full((2, 64), 3.0))  # real data afterwards: a positive amax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no headroom: all blocks are equal
        assert float(calibrator.compute_amax()) >= 3.0


# ----- calibrating a bare quantizer -----------------------------------------------------------------
def test_a_bare_sequential_quantizer_calibrates() -> None:
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    quantizer = SequentialQuantizer(
        TensorQuantizer(
            QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 8, "type": "static"})
        ),
        TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3))),
    )
    mtq.calibrate(quantizer, "max", lambda q: q(x))
    expected = x.abs().reshape(16, 4, 8).amax(-1)
    torch.testing.assert_close(quantizer[0].amax.reshape(16, 4), expected)
    assert quantizer[1].amax is not None and float(quantizer[1].amax) > 0


def test_a_bare_tensor_quantizer_calibrates_and_a_loop_that_never_runs_it_is_named() -> None:
    x = torch.randn(8, 8)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    mtq.calibrate(quantizer, "max", lambda q: q(x))
    assert float(quantizer.amax) == pytest.approx(float(x.abs().max()))
    with pytest.raises(mtq.model_quant.CalibrationError, match="without running the model"):
        mtq.calibrate(quantizer, "max", lambda q: None)


# ----- local_hessian and weights without blocks -----------------------------------------------------
def test_local_hessian_names_the_weights_it_does_not_search() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    x = torch.randn(16, 32)
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {
                "quantizer_name": "0.weight_quantizer",
                "cfg": {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}},
            },
            {"quantizer_name": "1.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        ],
        "algorithm": "local_hessian",
    }
    with pytest.warns(QuantWarning, match=r"weights of 1 have no blocks .* keep their max"):
        mtq.quantize(model, config, lambda m: m(x))
    # the per-channel weight is at max, the block-wise one was searched
    torch.testing.assert_close(
        model[1].weight_quantizer.amax.flatten(), model[1].weight.abs().amax(1)
    )
    block_max = model[0].weight.abs().reshape(32, 2, 16).amax(-1)
    assert not torch.equal(model[0].weight_quantizer.amax.reshape(32, 2), block_max)


# ----- plain torch.onnx.export of formats without an ONNX form -------------------------------------
@pytest.mark.parametrize("dynamo", [False, True])
def test_plain_onnx_export_of_nvfp4_names_the_quantizer(tmp_path, dynamo) -> None:
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 32)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(x))
    with pytest.raises(Exception, match=r"cannot trace quantizer 0\.input_quantizer \(NVFP4\)"):
        torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=dynamo)

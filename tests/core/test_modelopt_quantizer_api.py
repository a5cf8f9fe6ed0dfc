"""ModelOpt 0.47's TensorQuantizer / SequentialQuantizer / calibrator API, against ModelOpt's documented
behaviour (``nn/modules/tensor_quantizer.py``, ``calib/{max,histogram,mse}.py``) and float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import quant_core as mtq
from quant_core.calib import HistogramCalibrator, MaxCalibrator, MseCalibrator


def test_enable_alone_is_not_a_quantizer_config() -> None:
    with pytest.raises(ValueError, match="alone"):
        mtq.QuantizerAttributeConfig(enable=True)
    assert mtq.QuantizerAttributeConfig(enable=False).enable is False


def test_export_amax_shapes_and_step_size() -> None:
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    per_channel = mtq.TensorQuantizer(
        {"num_bits": 8, "axis": 0}, amax=w.abs().amax(1, keepdim=True)
    )
    assert per_channel.export_amax().shape == (6,)
    per_tensor = mtq.TensorQuantizer({"num_bits": 4}, amax=torch.tensor(0.0))
    exported = per_tensor.export_amax()
    assert exported.shape == (1,) and float(exported) == torch.finfo(torch.float32).tiny
    q = mtq.TensorQuantizer({"num_bits": 8, "unsigned": True}, amax=2.55)
    assert float(q.step_size) == pytest.approx(2.55 / 255)  # amax / (2^(8-1+1) - 1)
    assert float(mtq.TensorQuantizer({"num_bits": 4}, amax=7.0).step_size) == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="step_size"):
        assert mtq.TensorQuantizer().step_size is None
    with pytest.raises(ValueError, match="integer"):
        mtq.TensorQuantizer({"num_bits": (4, 3)}, amax=1.0).step_size  # noqa: B018


def test_load_calib_amax_passes_the_method_to_the_histogram() -> None:
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    q = mtq.TensorQuantizer(
        {"num_bits": 8, "calibrator": "histogram"}, if_calib=True, if_quant=False
    )
    q(x)
    q.load_calib_amax(method="percentile", percentile=99.0)
    expected = float(np.percentile(x.abs().numpy(), 99.0))
    assert float(q.amax) == pytest.approx(expected, rel=2e-3)  # bin width |x|max/2048
    empty = mtq.TensorQuantizer(if_calib=True)
    with pytest.raises(RuntimeError, match="seen no tensor"):
        empty.load_calib_amax(strict=True)


def test_quantizer_modelopt_state_round_trip() -> None:
    q = mtq.TensorQuantizer({"num_bits": 4, "axis": 0}, amax=torch.ones(3, 1))
    state = q.get_modelopt_state()
    assert state["_pytorch_state_metadata"] == {"_amax": [3, 1]}
    assert "_pytorch_state_metadata" not in q.get_modelopt_state(properties_only=True)
    fresh = mtq.TensorQuantizer()
    fresh.set_from_modelopt_state(state)
    fresh.load_state_dict(q.state_dict())
    assert (fresh.num_bits, fresh.axis) == (4, 0) and torch.equal(fresh.amax, q.amax)


def test_sequential_quantizer_broadcasts_one_config() -> None:
    seq = mtq.SequentialQuantizer(
        mtq.TensorQuantizer({"num_bits": 4}), mtq.TensorQuantizer({"num_bits": (4, 3)})
    )
    seq.set_from_attribute_config({"narrow_range": True})
    assert [q.narrow_range for q in seq] == [True, True] and seq[1].num_bits == (4, 3)


def test_max_calibrator_takes_modelopt_arguments_and_tracks_amax() -> None:
    cal = MaxCalibrator(8, 0, False, track_amax=True)
    batches = [torch.tensor([[1.0, -2.0], [0.5, 0.25]]), torch.tensor([[-3.0, 0.0], [0.125, 0.25]])]
    for b in batches:
        cal.collect(b)
    assert cal.compute_amax().flatten().tolist() == [3.0, 0.5]
    assert [a.flatten().tolist() for a in cal.amaxs] == [[2.0, 0.5], [3.0, 0.25]]


def test_histogram_calibrator_takes_modelopt_arguments() -> None:
    cal = HistogramCalibrator(8, None, False, num_bins=1000, skip_zeros=True)
    cal.collect(torch.cat([torch.zeros(10000), torch.linspace(0.001, 1.0, 1000)]))
    # zeros skipped: the 50th percentile of 0.001..1 is ~0.5 (it would be 0 with the zeros).
    assert float(cal.compute_amax("percentile", percentile=50.0)) == pytest.approx(0.5, abs=2e-3)
    with pytest.raises(ValueError, match="per-tensor"):
        HistogramCalibrator(8, axis=0)


def test_mse_calibrator_picks_the_least_error_multiple() -> None:
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 6.0  # an outlier in row 0 makes a smaller amax better there
    amax = x.abs().amax(1, keepdim=True)

    def int4(t, a):
        return mtq.tensor_quant.fake_tensor_quant(t, a, num_bits=4)

    cal = MseCalibrator(
        amax, axis=0, step_size=0.25, start_multiplier=0.25, stop_multiplier=1.0, quant_func=int4
    )
    cal.collect(x)
    best = cal.compute_amax()
    for row in range(4):  # float64 brute force over the same four candidates
        errs = [
            float(((int4(x[row], amax[row] * m).double() - x[row].double()) ** 2).sum())
            for m in (0.25, 0.5, 0.75, 1.0)
        ]
        assert float(best[row]) == pytest.approx(
            float(amax[row]) * (0.25, 0.5, 0.75, 1.0)[int(np.argmin(errs))]
        )
    assert float(best[0]) < float(amax[0])

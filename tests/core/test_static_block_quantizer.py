"""ModelOpt 0.47's static block quantizer names: ``StaticBlockScaleQuantizer``, ``_amax_to_scale``,
``_FP8_E4M3_MIN_POSITIVE``, ``tensor_quant.int_cast_ste``, its private attribute names, LSQ's
``dtype`` and flags, ``utils.SharedWeightGlobalAmaxState``, ``promote_nvfp4_static_quantizers``,
``enable_fake_quant`` and the weight MSE calibrator with its backend registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core import calib
from quant_core.model_calib import (
    _FP8_SWEEP_CALIBRATOR_REGISTRY,
    _make_weight_mse_calibrator,
    _register_fp8_sweep_calibrator,
    _run_weight_scale_calibration,
    mse_calibrate,
)
from quant_core.nn import NVFP4StaticQuantizer, QuantLinear, StaticBlockScaleQuantizer
from quant_core.nn.modules.tensor_quantizer import (
    _FP8_E4M3_MIN_POSITIVE,
    _QUANT_FUNCTIONAL_BACKENDS,
    _amax_to_scale,
)
from quant_core.tensor_quant import int_cast_ste
from quant_core.utils import (
    SharedWeightGlobalAmaxState,
    enable_fake_quant,
    promote_nvfp4_static_quantizers,
)

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}
INT4 = {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}


def test_amax_to_scale_and_the_smallest_e4m3() -> None:
    amax = torch.tensor([0.0, 1e-9, 3.5, 7.0], dtype=torch.float64)
    ref = amax / 7.0
    ref = torch.where(ref <= 1e-8, torch.full_like(ref, 1e-8), ref)
    torch.testing.assert_close(_amax_to_scale(amax.half(), 7.0).double(), ref, rtol=1e-3, atol=0)
    assert _amax_to_scale(amax, 7.0).dtype == torch.float32
    assert _amax_to_scale(amax, 7.0, min_value=0.25).tolist() == [0.25, 0.25, 0.5, 1.0]
    # the smallest E4M3 subnormal: 2^-6 (smallest normal) / 2^3 (three mantissa bits)
    assert _FP8_E4M3_MIN_POSITIVE == 2.0**-9
    e4m3 = torch.tensor([2.0**-9, 2.0**-11]).to(torch.float8_e4m3fn).float()
    assert e4m3.tolist() == [2.0**-9, 0.0]


@pytest.mark.parametrize(
    ("unsigned", "narrow", "lo", "hi"),
    [(False, True, -7, 7), (False, False, -8, 7), (True, False, 0, 15)],
)
def test_int_cast_ste(unsigned: bool, narrow: bool, lo: int, hi: int) -> None:
    x = torch.tensor([-9.6, -7.4, -2.5, -0.4, 0.6, 3.49, 6.7, 14.6, 20.0], requires_grad=True)
    y = int_cast_ste(x, 4, unsigned, narrow)
    ref = torch.clamp(torch.round(x.detach().double()), lo, hi)
    assert torch.equal(y.double(), ref)
    y.backward(torch.arange(1.0, 10.0))
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(x.grad, torch.where(inside, torch.arange(1.0, 10.0), 0.0))
    with pytest.raises(ValueError, match="integer num_bits"):
        int_cast_ste(x, (2, 1))


def _int4_by_private_names(amax: torch.Tensor) -> StaticBlockScaleQuantizer:
    tq = mtq.TensorQuantizer()
    tq._num_bits = 4
    tq._unsigned = False
    tq._narrow_range = True
    tq._block_sizes = {-1: 16}
    tq._pass_through_bwd = True
    tq.register_buffer("_amax", amax)
    return StaticBlockScaleQuantizer.from_tensor_quantizer(tq)


def test_private_attribute_names_set_the_format() -> None:
    q = _int4_by_private_names(torch.ones(4))
    assert isinstance(q, StaticBlockScaleQuantizer) and not isinstance(q, NVFP4StaticQuantizer)
    assert q.num_bits == 4 and q.block_sizes == {-1: 16} and q.narrow_range
    assert q._quant_max_bound == 7.0 and not q.has_quantized_block_scale
    x = torch.randn(4, 16)
    s = x.double().abs().amax(-1, keepdim=True) / 7  # per-block scale, here one block per row
    q.amax = x.abs().amax(-1)
    ref = torch.clamp(torch.round(x.double() / s), -7, 7) * s
    torch.testing.assert_close(q._fake_quantize(x).double(), ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="static block"):
        StaticBlockScaleQuantizer.from_tensor_quantizer(mtq.TensorQuantizer({"num_bits": 8}))
    pinned = mtq.TensorQuantizer({"num_bits": 8, "constant_amax": 2.5})
    assert pinned._constant_amax == 2.5 and pinned._use_constant_amax is False
    assert pinned._fake_quant is True and pinned._dynamic is False and not pinned.is_mx_format
    with pytest.raises(ValueError, match="fake_quant=False"):
        pinned._fake_quant = False  # the validated setter: quant-core only fake-quantizes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lsq_dtype_flags_and_a_flat_block_amax(dtype: torch.dtype) -> None:
    amax = torch.tensor([3.5, 1.0, 2.0, 7.0])
    q = _int4_by_private_names(amax.clone())
    q.enable_lsq(quantize_scales=False, learnable_amax=["pre", "post"], dtype=dtype)
    assert q._lsq is True and q._tied_amax is False and q._quantize_pre_scale is True
    assert q._quantize_scales is False
    assert q._amax_pre.dtype == dtype and isinstance(q._amax_post, nn.Parameter)
    x = torch.randn(4, 16)
    out = q._fake_quantize(x)  # a (4,) amax: one per block of each row
    s = amax.to(dtype).double().unsqueeze(-1) / 7
    ref = torch.clamp(torch.round(x.double() / s), -7, 7) * s
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert q._amax_pre.grad is not None and q._amax_post.grad is not None
    tied = _int4_by_private_names(amax.clone())
    tied.enable_lsq(quantize_scales=False, learnable_amax=["pre", "post"], tied_amax=True)
    assert tied._tied_amax is True and tied.amax_pre is tied._amax_post
    assert mtq.TensorQuantizer()._lsq is False


def _nvfp4_static(w: torch.Tensor) -> mtq.TensorQuantizer:
    q = mtq.TensorQuantizer(NVFP4)
    q.calibrate_from(w)
    return q


def test_shared_weight_global_amax_state_ties_one_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 32, generator=gen) * (i + 1) for i in range(3)]
    qs = [_nvfp4_static(w) for w in ws]
    state = SharedWeightGlobalAmaxState()
    assert state.global_amax is None and not state.tie_member_quantizer(qs[0])
    state.global_amax = max(float(w.abs().max()) for w in ws)
    for q in qs:
        assert state.tie_member_quantizer(q)
    assert all(q._global_amax is state.global_amax for q in qs)
    assert state.member_quantizers == tuple(qs)
    state.global_amax = 2 * float(ws[2].abs().max())  # in place: every member sees it
    for q, w in zip(qs, ws):
        assert float(q.global_amax) == pytest.approx(2 * float(ws[2].abs().max()))
        alone = _nvfp4_static(w)
        alone.global_amax = q.global_amax.clone()
        assert torch.equal(q(w), alone(w))
    low = SharedWeightGlobalAmaxState()
    low.global_amax = 0.5 * float(ws[0].abs().max())
    with pytest.raises(ValueError, match="below"):
        low.tie_member_quantizer(_nvfp4_static(ws[0]))


def test_promote_static_block_weight_quantizers() -> None:
    model = nn.Sequential(QuantLinear(32, 4, bias=False), QuantLinear(32, 4, bias=False))
    model[0].weight_quantizer.set_from_attribute_config(NVFP4)
    model[1].weight_quantizer.set_from_attribute_config(INT4)
    assert promote_nvfp4_static_quantizers(model) == 0  # not calibrated yet
    for layer in model:
        layer.weight_quantizer.calibrate_from(layer.weight.detach())
    assert promote_nvfp4_static_quantizers(model) == 1
    assert isinstance(model[0].weight_quantizer, NVFP4StaticQuantizer)
    assert float(model[0].weight_quantizer.global_amax) == float(model[0].weight.abs().max())
    assert type(model[1].weight_quantizer) is StaticBlockScaleQuantizer
    assert promote_nvfp4_static_quantizers(model) == 0


def test_enable_fake_quant_keeps_fake_quantization() -> None:
    model = nn.Sequential(QuantLinear(8, 8), QuantLinear(8, 8))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    before = [layer.weight_quantizer.attribute_config for layer in model]
    w = model[0].weight.detach()
    with enable_fake_quant(model):  # quant-core quantizers always fake-quantize
        assert all(layer.weight_quantizer.fake_quant for layer in model)
        assert torch.equal(model[0].weight_quantizer(w), model[0].weight_quantizer.fake_quantize(w))
    assert [layer.weight_quantizer.attribute_config for layer in model] == before


def _mse_ref(w: torch.Tensor, amax0: torch.Tensor, mults: list[float], qmax: int) -> torch.Tensor:
    """Per-row best candidate ``amax0 * m`` by float64 INT8 squared error."""
    w = w.double()
    best_err, best = None, None
    for m in mults:
        a = amax0.double() * m
        s = a / qmax
        err = ((torch.clamp(torch.round(w / s), -qmax, qmax) * s - w) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best = err, a.clone()
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, a, best)
    return best


def test_weight_mse_calibrator_per_channel_matches_a_float64_search() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 64, generator=gen)
    w[:, 0] = 12.0  # an outlier column: a smaller amax wins
    q = mtq.TensorQuantizer({"num_bits": 8, "axis": 0})
    q.calibrate_from(w)
    cal = _make_weight_mse_calibrator(q, 0.1, 0.3, 1.0, fp8_scale_sweep=False)
    assert isinstance(cal, calib.MseCalibrator)
    cal.collect(w)
    amax = cal.compute_amax()
    mults = [0.3 + 0.1 * i for i in range(8)]
    ref = _mse_ref(w, w.abs().amax(-1, keepdim=True), mults, 127)
    torch.testing.assert_close(amax.double().reshape(ref.shape), ref, rtol=1e-6, atol=0)
    assert torch.equal(q.amax.flatten(), w.abs().amax(-1))  # the quantizer's own amax is back
    off = mtq.TensorQuantizer({"num_bits": 8, "type": "dynamic"})
    assert _make_weight_mse_calibrator(off, 0.1, 0.3, 1.0, fp8_scale_sweep=False) is None


def test_fp8_scale_sweep_uses_the_backend_registry() -> None:
    calls = []

    def factory(amax, axis, quant_func):
        calls.append((amax.clone(), axis))
        return calib.MseCalibrator(amax=amax, axis=axis, quant_func=quant_func)

    _register_fp8_sweep_calibrator("_t_identity", factory)
    mtq.nn.register_quant_backend("_t_identity", lambda x, q: x)
    try:
        assert _FP8_SWEEP_CALIBRATOR_REGISTRY["_t_identity"] is factory
        assert "_t_identity" in _QUANT_FUNCTIONAL_BACKENDS
        model = nn.Linear(8, 8, bias=False)
        cfg = {
            "quant_cfg": [
                {"quantizer_name": "*", "enable": False},
                {
                    "quantizer_name": "*weight_quantizer",
                    "cfg": {"num_bits": 8, "backend": "_t_identity"},
                },
            ],
            "algorithm": "max",
        }
        mtq.quantize(model, cfg, lambda m: m(torch.randn(2, 8)))
        w_amax = float(model.weight_quantizer.amax)
        mse_calibrate(model, None, fp8_scale_sweep=False)
        assert calls == []
        mse_calibrate(model, None, fp8_scale_sweep=True)
        assert len(calls) == 1 and float(calls[0][0]) == pytest.approx(w_amax)
        # identity backend: every candidate has zero error, the first (0.25 * amax) is kept
        assert float(model.weight_quantizer.amax) == pytest.approx(0.25 * w_amax)
    finally:
        _FP8_SWEEP_CALIBRATOR_REGISTRY.pop("_t_identity", None)
        mtq.nn.unregister_quant_backend("_t_identity")
    nvfp4 = _nvfp4_static(torch.randn(4, 32))
    with pytest.raises(ValueError, match="fp8_scale_sweep"):
        _make_weight_mse_calibrator(nvfp4, 0.1, 0.25, 4.0, fp8_scale_sweep=True)


def test_run_weight_scale_calibration_runs_the_named_algorithm() -> None:
    model = nn.Sequential(QuantLinear(32, 4, bias=False))
    model[0].weight_quantizer.set_from_attribute_config(INT4)
    model[0].input_quantizer.disable()
    _run_weight_scale_calibration(model, None, {"method": "max"})
    w = model[0].weight.detach().double()
    ref = w.reshape(4, 2, 16).abs().amax(-1)
    torch.testing.assert_close(model[0].weight_quantizer.amax.double().reshape(4, 2), ref)
    with pytest.raises(ValueError, match="scale_algorithm"):
        _run_weight_scale_calibration(model, None, "smoothquant")

"""TensorQuantizer numerics against independent references (float64 math, torch's native float8)."""

from __future__ import annotations

import pytest
import torch

from quant_core.config import QuantizerAttributeConfig as Attrs
from quant_core.nn import SequentialQuantizer, TensorQuantizer


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def int_ref(
    x64: torch.Tensor, amax64: torch.Tensor, bits: int, narrow=False, unsigned=False
) -> torch.Tensor:
    qmax = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    qmin = 0 if unsigned else (-qmax if narrow else -qmax - 1)
    scale = amax64 / qmax
    return torch.clamp(torch.round(x64 / scale), qmin, qmax) * scale


def fp8_ref(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax.double() / 448
    q = (x.double() / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    return q.double() * scale


def calibrated(attrs: Attrs, *batches: torch.Tensor) -> TensorQuantizer:
    q = TensorQuantizer(attrs)
    q.disable_quant()
    q.enable_calib()
    for b in batches:
        q(b)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    return q


@pytest.mark.parametrize(("narrow", "unsigned"), [(False, False), (True, False), (False, True)])
def test_int8_per_tensor_matches_float64_and_rounds_half_to_even(narrow, unsigned):
    qmax = 255 if unsigned else 127
    amax = torch.tensor(
        qmax * 0.125
    )  # scale exactly 0.125, so every input below is exact in float32
    x = (
        torch.arange(-2200, 2201, dtype=torch.float64) * 0.0625
    ).float()  # every level and every tie
    if unsigned:
        x = x.abs()
    q = TensorQuantizer(Attrs(num_bits=8, narrow_range=narrow, unsigned=unsigned), amax=amax)
    got = q(x).double()
    ref = int_ref(x.double(), amax.double(), 8, narrow, unsigned)
    assert torch.equal(got, ref)
    # 0.3125 and 0.4375 sit exactly between levels 2|3 and 3|4: ties go to the even level.
    ties = q(torch.tensor([0.3125, 0.4375])) / 0.125
    assert torch.equal(ties, torch.tensor([2.0, 4.0]))


def test_per_channel_calibration_collects_running_max_per_row():
    a = torch.randn(6, 20, generator=gen(1))
    b = torch.randn(6, 20, generator=gen(2)) * 3
    q = calibrated(Attrs(num_bits=8, axis=0), a, b)
    expected = torch.maximum(a.abs().amax(1), b.abs().amax(1))
    assert torch.equal(q.amax.reshape(-1), expected)
    ref = int_ref(a.double(), expected.double()[:, None], 8)
    assert torch.allclose(q(a).double(), ref, rtol=1e-6, atol=1e-7)


def test_int4_static_block_quantization_matches_float64_blocks():
    w = torch.randn(8, 256, generator=gen(3))
    q = calibrated(Attrs(num_bits=4, block_sizes={-1: 128, "type": "static"}), w)
    blocks = w.double().reshape(8, 2, 128)
    ref = int_ref(blocks, blocks.abs().amax(-1, keepdim=True), 4).reshape(8, 256)
    assert q.amax.numel() == 16
    assert torch.allclose(q(w).double(), ref, rtol=1e-6, atol=1e-7)


def test_fp8_per_tensor_matches_native_float8_cast():
    x = torch.randn(64, 64, generator=gen(4)) * 5
    q = calibrated(Attrs(num_bits=(4, 3)), x)
    assert q.amax == x.abs().max()
    assert torch.allclose(q(x).double(), fp8_ref(x, q.amax), rtol=1e-6, atol=0)


def test_fp8_per_token_dynamic_needs_no_calibration(recwarn):
    x = torch.randn(3, 5, 32, generator=gen(5)) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    q = TensorQuantizer(Attrs(num_bits=(4, 3), type="dynamic", block_sizes={-1: None}))
    got = q(x).double()
    ref = fp8_ref(x, x.abs().amax(-1, keepdim=True))
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    assert not [w for w in recwarn if "never calibrated" in str(w.message)]
    assert q.amax is None


def test_mxfp8_blocks_use_power_of_two_scales():
    x = torch.randn(4, 64, generator=gen(6)) * 7
    q = TensorQuantizer(
        Attrs(num_bits=(4, 3), block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)})
    )
    blocks = x.double().reshape(4, 2, 32)
    # E8M0 block scale 2**ceil(log2(amax / 448)) (ModelOpt's choice, so amax never clips), E4M3 elements.
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True) / 448)))
    ref = (
        (blocks / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale
    ).reshape(4, 64)
    assert torch.allclose(q(x).double(), ref, rtol=1e-6, atol=0)


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (0, .5, 1, 1.5, 2, 3, 4, 6), ties to even mantissa, saturating at 6."""
    a = v.abs().clamp(max=6.0)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.sign(v) * torch.round(a / step) * step


def test_nvfp4_uses_calibrated_global_amax_and_e4m3_block_scales():
    x = torch.randn(4, 64, generator=gen(7)) * 3
    attrs = Attrs(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    q = calibrated(attrs, x * 2)  # calibrated global amax = 2 * max|x|
    assert torch.allclose(q.amax, (x * 2).abs().max())
    gscale = q.amax.double() / (6 * 448)
    blocks = x.double().reshape(4, 4, 16)
    bscale = (blocks.abs().amax(-1, keepdim=True) / 6 / gscale).float().to(
        torch.float8_e4m3fn
    ).double() * gscale
    ref = (e2m1_round(blocks / bscale) * bscale).reshape(4, 64)
    assert torch.allclose(q(x).double(), ref, rtol=1e-6, atol=1e-7)


def test_w4a8_sequential_is_fp8_of_int4_blocks():
    from quant_core.algorithms.statistics import calibrate_weights

    w = torch.randn(4, 256, generator=gen(8))
    layer = torch.nn.Linear(256, 4)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.weight_quantizer = SequentialQuantizer(
        TensorQuantizer(Attrs(num_bits=4, block_sizes={-1: 128, "type": "static"})),
        TensorQuantizer(Attrs(num_bits=(4, 3))),
    )
    calibrate_weights(layer)
    blocks = w.double().reshape(4, 2, 128)
    int4 = int_ref(blocks, blocks.abs().amax(-1, keepdim=True), 4).reshape(4, 256)
    ref = fp8_ref(int4.float(), int4.abs().max().float())
    assert torch.allclose(layer.weight_quantizer(w).double(), ref, rtol=1e-6, atol=1e-7)


def test_clipped_straight_through_gradient_inside_range_zero_outside():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 2.5], requires_grad=True)
    q = TensorQuantizer(Attrs(num_bits=8, pass_through_bwd=False), amax=1.0)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_learnable_amax_receives_lsq_gradient():
    q = TensorQuantizer(Attrs(num_bits=4, learn_amax=True), amax=7.0)  # scale 1.0
    assert isinstance(q._amax, torch.nn.Parameter)
    x = torch.tensor([-9.0, 0.4, 2.6, 9.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([-8.0, 0.0, 3.0, 7.0]))
    y.sum().backward()
    # LSQ: d y / d amax = (q(v) - v) / qmax inside the range, q(v) / qmax = -8/7, 1 when clipped (v = x / scale).
    expected = (-8.0 + (0.0 - 0.4) + (3.0 - 2.6) + 7.0) / 7
    assert torch.allclose(q._amax.grad, torch.tensor(expected), atol=1e-6)
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_disabled_quantizer_passes_through_but_applies_pre_quant_scale():
    x = torch.randn(4, 8, generator=gen(9))
    q = TensorQuantizer(Attrs(num_bits=4), amax=1.0)
    q.disable()
    assert torch.equal(q(x), x)
    scale = torch.linspace(0.5, 2.0, 8)
    q.pre_quant_scale = scale
    assert torch.equal(q(x), x * scale)
    q.enable()
    assert torch.allclose(
        q(x).double(),
        int_ref((x * scale).double(), torch.tensor(1.0, dtype=torch.float64), 4),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_amax_is_rejected_with_the_quantizer_name(bad):
    q = TensorQuantizer()
    q._name = "layer.input_quantizer"
    with pytest.raises(ValueError, match=r"layer\.input_quantizer"):
        q.amax = bad


def test_uncalibrated_static_quantizer_warns_once_with_its_name():
    q = TensorQuantizer(Attrs(num_bits=8))
    q._name = "encoder.fc.input_quantizer"
    x = torch.randn(10, generator=gen(10))
    with pytest.warns(RuntimeWarning, match=r"encoder\.fc\.input_quantizer .*never calibrated"):
        y = q(x)
    assert torch.allclose(y.double(), int_ref(x.double(), x.abs().max().double(), 8), rtol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(x)  # second call: no second warning


def test_histogram_percentile_matches_quantile():
    x = torch.randn(200_000, generator=gen(11))
    q = calibrated(Attrs(num_bits=8, calibrator="percentile"), x[:100_000], x[100_000:])
    expected = torch.quantile(x.abs().double(), 0.9999).item()
    width = x.abs().max().item() / 2048
    assert abs(q.amax.item() - expected) < 3 * width


def _mse(x: torch.Tensor, amax: float, bits: int = 8) -> float:
    x64 = x.double()
    return float(
        (int_ref(x64, torch.tensor(amax, dtype=torch.float64), bits) - x64).square().mean()
    )


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_histogram_mse_and_entropy_clip_outliers_and_lower_error(method):
    x = torch.randn(50_000, generator=gen(12))
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -45.0])  # rare outliers
    q = calibrated(Attrs(num_bits=4, calibrator=method), x)
    amax = q.amax.item()
    assert amax < 45.0
    assert _mse(x, amax, 4) < _mse(x, 45.0, 4)


def test_static_bias_is_calibrated_mean_and_added_back():
    x = torch.randn(4, 16, generator=gen(13)) + 5.0
    attrs = Attrs(num_bits=8, bias={-1: None, "type": "static"})
    q = calibrated(attrs, x)
    mean = x.mean(-1, keepdim=True)
    centred = (x - mean).double()
    ref = int_ref(centred, centred.abs().max(), 8) + mean.double()
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_format_is_parsed_from_the_attributes_and_follows_them():
    q = TensorQuantizer(
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    )
    assert q.format.name == "NVFP4" and q.format.dynamic and q.format.has_global_amax
    assert q.format is q.attribute_config.quant_format()
    q.num_bits = 8
    q.block_sizes = None
    q.axis = 0
    assert q.format.name == "INT8" and q.format.axis == 0 and not q.format.dynamic

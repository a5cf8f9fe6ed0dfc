"""FP element grids (FP8, FP6, FP4): every code, ties, subnormals, saturation, NaN/Inf, against independent references."""

from __future__ import annotations

import pytest
import torch
from kernels_refs import E2M1_POSITIVE, FP_MAX, fp_fake_quant64, fp_positive_values, round_to_table

import quant_kernels as qk

FP8 = [((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2)]
ALL_FP = [(4, 3), (5, 2), (3, 2), (2, 3), (2, 1)]


@pytest.mark.parametrize(("pair", "dtype"), FP8)
def test_every_fp8_code_is_a_fixed_point(pair, dtype):
    """With amax = the format max the scale is 1, so every finite code value must come back unchanged."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values)]
    y = qk.fake_quantize(values, pair, amax=torch.tensor(FP_MAX[pair]))
    assert torch.equal(y, values)
    assert not torch.signbit(y[values == 0]).any()  # documented: zeros come out +0


@pytest.mark.parametrize(("pair", "dtype"), FP8)
def test_fp8_midpoints_round_half_to_even_like_torch(pair, dtype):
    """Midpoints between neighbouring codes are exact ties; torch's native cast rounds them half to even."""
    pos = torch.tensor(fp_positive_values(*pair), dtype=torch.float64)
    mids = ((pos[1:] + pos[:-1]) / 2).float()
    x = torch.cat([mids, -mids])
    y = qk.fake_quantize(x, pair, amax=torch.tensor(FP_MAX[pair]))
    assert torch.equal(y, x.to(dtype).float())
    assert torch.equal(y.double(), round_to_table(x.double(), pos.tolist()))


@pytest.mark.parametrize(("pair", "dtype"), FP8)
def test_fp8_random_values_match_native_cast(pair, dtype):
    torch.manual_seed(0)
    top = FP_MAX[pair]
    # log-uniform magnitudes covering subnormals through the max
    x = torch.exp2(torch.empty(20000).uniform_(-20, 16)) * torch.randn(20000).sign()
    x = x.clamp(-top, top)
    y = qk.fake_quantize(x, pair, amax=torch.tensor(top))
    assert torch.equal(y, x.to(dtype).float())


@pytest.mark.parametrize("pair", [(3, 2), (2, 3), (2, 1)])
def test_small_fp_every_code_and_every_midpoint(pair):
    pos = fp_positive_values(*pair)
    values = torch.tensor(pos + [-v for v in pos], dtype=torch.float32)
    amax = torch.tensor(FP_MAX[pair])
    assert torch.equal(qk.fake_quantize(values, pair, amax=amax), values)
    p = torch.tensor(pos, dtype=torch.float64)
    mids = ((p[1:] + p[:-1]) / 2).float()
    x = torch.cat([mids, -mids])
    assert torch.equal(
        qk.fake_quantize(x, pair, amax=amax).double(), round_to_table(x.double(), pos)
    )


def test_e2m1_ties_by_hand():
    """Spec table ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (even mantissa); 7, 1e9 saturate to 6."""
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e9, -0.25, -5.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -4.0])
    assert torch.equal(qk.fake_quantize(x, (2, 1), amax=torch.tensor(6.0)), want)
    assert E2M1_POSITIVE[-1] == 6.0


@pytest.mark.parametrize("pair", ALL_FP)
def test_scaled_fp_matches_float64_reference(pair):
    torch.manual_seed(1)
    x = torch.randn(64, 96) * 3
    amax = torch.tensor(2.5)  # values beyond 2.5 saturate
    y = qk.fake_quantize(x, pair, amax=amax)
    assert torch.equal(y.double(), fp_fake_quant64(x, amax, *pair))


@pytest.mark.parametrize("pair", ALL_FP)
def test_fp_saturates_huge_and_inf_and_keeps_nan(pair):
    amax = torch.tensor(3.0)
    x = torch.tensor([1e30, -1e30, float("inf"), float("-inf"), float("nan"), 3.0, -3.0, 0.0])
    y = qk.fake_quantize(x, pair, amax=amax)
    assert y[:4].tolist() == [3.0, -3.0, 3.0, -3.0]
    assert torch.isnan(y[4])
    assert y[5:].tolist() == [3.0, -3.0, 0.0]  # exactly +-amax survive


def test_fp8_subnormals_scale_one():
    """E4M3 subnormals are multiples of 2**-9; E5M2's of 2**-16. Round them like the native cast."""
    for pair, dtype, step in [
        ((4, 3), torch.float8_e4m3fn, 2.0**-9),
        ((5, 2), torch.float8_e5m2, 2.0**-16),
    ]:
        x = torch.arange(-40, 41, dtype=torch.float32) * (step / 4)
        y = qk.fake_quantize(x, pair, amax=torch.tensor(FP_MAX[pair]))
        assert torch.equal(y, x.to(dtype).float())


@pytest.mark.parametrize(("pair", "dtype"), FP8)
def test_fp8_per_token_dynamic(pair, dtype):
    torch.manual_seed(2)
    x = torch.randn(8, 4, 64) * torch.logspace(-3, 3, 8).view(8, 1, 1)
    y = qk.fake_quantize(x, pair, block_sizes={-1: None})
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(y.double(), fp_fake_quant64(x, amax, *pair))


def test_fp8_2d_blocks_dynamic():
    torch.manual_seed(3)
    x = torch.randn(256, 384)
    y = qk.fake_quantize(x, (4, 3), block_sizes={-1: 128, -2: 128})
    amax = x.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3), keepdim=True)
    want = fp_fake_quant64(x.reshape(2, 128, 3, 128), amax, 4, 3).reshape(256, 384)
    assert torch.equal(y.double(), want)


def test_fp8_per_channel_static():
    torch.manual_seed(4)
    x = torch.randn(16, 32)
    amax = torch.rand(16, 1) + 0.1
    y = qk.fake_quantize(x, (4, 3), amax=amax)
    assert torch.equal(y.double(), fp_fake_quant64(x, amax, 4, 3))


@pytest.mark.parametrize("fmt", [(4, 3), (2, 1), 8])
def test_dynamic_groups_with_subnormal_scales_still_saturate(fmt):
    """amax / M underflows to a coarse subnormal scale, so x / scale can exceed M: it must saturate."""
    torch.manual_seed(22)
    top = 127 if isinstance(fmt, int) else FP_MAX[fmt]
    x = torch.randn(4, 32)
    # amax / M = 1.49 * 2**-149 rounds to 2**-149, so x / scale reaches 1.49 * M
    x[1] = torch.linspace(-1, 1, 32) * (top * 1.49 * 2.0**-149)
    x[2] *= 1e-38
    y = qk.fake_quantize(x, fmt, block_sizes={-1: None})
    amax = x.abs().amax(-1, keepdim=True)
    if isinstance(fmt, int):
        from kernels_refs import int_fake_quant64

        want = int_fake_quant64(x, amax, fmt)
    else:
        want = fp_fake_quant64(x, amax, *fmt)
    assert torch.equal(y.double(), want)

"""NVFP4 (E4M3 block scales + global scale) and MX (E8M0 scales): float32-step references and spec cases."""

from __future__ import annotations

import math

import pytest
import torch
from kernels_refs import E2M1_POSITIVE, FP_MAX, fp_positive_values, round_to_table

import quant_kernels as qk


def nvfp4_ref(
    x: torch.Tensor, global_amax: float | None = None, amax: torch.Tensor | None = None
) -> torch.Tensor:
    """NVFP4 per the NVIDIA recipe: g = gamax/(6*448); s = e4m3(amax/6/g) * g; y = e2m1(x/s) * s (float32 steps)."""
    rows, cols = x.shape
    xb = x.float().reshape(rows, cols // 16, 16)
    if amax is None:
        amax = xb.abs().amax(-1, keepdim=True)
    if global_amax is None:
        global_amax = amax.max().item()
    g = torch.tensor(global_amax, dtype=torch.float32) / (6.0 * 448.0)
    r = (amax.reshape(rows, cols // 16, 1).float() / 6.0 / (g if g > 0 else 1.0)).clamp(max=448.0)
    s = r.to(torch.float8_e4m3fn).float() * g  # torch's native E4M3 cast rounds the block scale
    q = round_to_table((xb / torch.where(s == 0, 1.0, s)).double(), E2M1_POSITIVE)
    return (q * s.double()).float().reshape(rows, cols)


def mx_ref(x: torch.Tensor, pair_or_bits, block: int = 32) -> torch.Tensor:
    """MX per ModelOpt: scale = 2**ceil(log2(amax / M)) (E8M0 range), elements rounded on their grid."""
    rows, cols = x.shape
    xb = x.float().reshape(rows, cols // block, block)
    is_int = isinstance(pair_or_bits, int)
    top = 127.0 if is_int else FP_MAX[pair_or_bits]
    shift = 6 if is_int else 0
    r = (xb.abs().amax(-1, keepdim=True) / top).flatten().tolist()
    units = []
    for v in r:
        if v == 0:
            unit = -127
        else:
            mant, exp = math.frexp(v)
            unit = exp - 1 if mant == 0.5 else exp
        units.append(min(max(unit, -127 - shift), 127 - shift))
    scale = torch.tensor([2.0**u for u in units], dtype=torch.float64).reshape(
        rows, cols // block, 1
    )
    v = (xb.double() / scale).float().double()
    q = (
        v.round().clamp(-128, 127)
        if is_int
        else round_to_table(v, fp_positive_values(*pair_or_bits))
    )
    return (q * scale).float().reshape(rows, cols)


def test_nvfp4_unit_scales_are_plain_e2m1():
    """global_amax = 6*448 makes g = 1; a block whose amax is 6 gets block scale 1: pure E2M1 rounding."""
    x = torch.tensor(
        [[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -6.0, -0.3, 0.1, 4.4, -2.2, 1.0, 0.0, 3.0]]
    )
    y = qk.fake_quantize(
        x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3), global_amax=torch.tensor(6 * 448.0)
    )
    want = torch.tensor(
        [[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, -0.5, 0.0, 4.0, -2.0, 1.0, 0.0, 3.0]]
    )
    assert torch.equal(y, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_dynamic_matches_reference(dtype):
    torch.manual_seed(10)
    x = (torch.randn(32, 128) * torch.logspace(-2, 2, 32).view(32, 1)).to(dtype)
    y = qk.fake_quantize(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert y.dtype == dtype
    assert torch.equal(y, nvfp4_ref(x).to(dtype))


def test_nvfp4_static_amax_and_global_amax():
    torch.manual_seed(11)
    x = torch.randn(8, 64)
    amax = qk.reduce_amax(x, block_sizes={-1: 16}) * 0.9  # clip a little
    gamax = torch.tensor(3.0)  # below the tensor's amax: block scales saturate at 448
    y = qk.fake_quantize(
        x, (2, 1), amax=amax, block_sizes={-1: 16}, scale_bits=(4, 3), global_amax=gamax
    )
    assert torch.equal(y, nvfp4_ref(x, global_amax=3.0, amax=amax))
    # without global_amax, the static default is the max of the per-block amax
    y2 = qk.fake_quantize(x, (2, 1), amax=amax, block_sizes={-1: 16}, scale_bits=(4, 3))
    assert torch.equal(y2, nvfp4_ref(x, global_amax=amax.max().item(), amax=amax))


def test_nvfp4_scale_bits_from_modelopt_style_dict():
    x = torch.randn(4, 32)
    a = qk.fake_quantize(x, (2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})
    b = qk.fake_quantize(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert torch.equal(a, b)


def test_nvfp4_tiny_blocks_underflow_to_zero_not_nan():
    x = torch.zeros(1, 32)
    x[0, 0] = 1000.0
    x[0, 16:] = 1e-6  # block scale underflows E4M3 relative to the global scale
    y = qk.fake_quantize(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert y[0, 0] == 1000.0 * 1.0 and not torch.isnan(y).any()
    assert torch.equal(y[0, 16:], torch.zeros(16))


@pytest.mark.parametrize("fmt", [(4, 3), (5, 2), (3, 2), (2, 3), (2, 1), 8])
def test_mx_matches_reference(fmt):
    torch.manual_seed(12)
    x = torch.randn(16, 128) * torch.logspace(-6, 6, 16).view(16, 1)
    y = qk.fake_quantize(x, fmt, block_sizes={-1: 32}, scale_bits=(8, 0))
    assert torch.equal(y, mx_ref(x, fmt))


def test_mx_scale_never_clips_amax():
    """ceil(log2(amax / M)): the block's largest magnitude maps inside the grid, so it is not clipped to M."""
    x = torch.full((1, 32), 0.01)
    x[0, 0] = 7.9  # OCP floor rule would clip this to 6 * 2**0; ModelOpt's ceil rule uses scale 2
    y = qk.fake_quantize(x, (2, 1), block_sizes={-1: 32}, scale_bits=(8, 0))
    assert y[0, 0] == 8.0


def test_mx_scales_export_as_e8m0():
    x = torch.randn(2, 64)
    qt = qk.quantize_to_codes(x, (4, 3), block_sizes={-1: 32}, scale_bits=(8, 0))
    assert qt.scale.dtype == torch.float8_e8m0fnu and qt.scale.shape == (2, 2)
    amax = x.reshape(2, 2, 32).abs().amax(-1)
    want = torch.tensor(
        [[math.ceil(math.log2(a / 448.0)) + 127 for a in row] for row in amax.tolist()]
    )
    assert torch.equal(qt.scale.view(torch.uint8).long(), want)
    # torch's own E8M0 decoding agrees with the scale the fake quantizer used
    assert torch.equal(
        qt.dequantize(), qk.fake_quantize(x, (4, 3), block_sizes={-1: 32}, scale_bits=(8, 0))
    )


def test_mxint8_scale_is_the_shared_exponent_with_implicit_2_pow_minus_6():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([1.0, -0.5, 0.25, 0.3])
    qt = qk.quantize_to_codes(x, 8, block_sizes={-1: 32}, scale_bits=(8, 0))
    # amax 1.0 -> scale 2**ceil(log2(1/127)) = 2**-6, shared exponent 0 -> E8M0 code 127
    assert qt.scale.view(torch.uint8).item() == 127
    assert qt.codes[0, :4].tolist() == [64, -32, 16, 19]


def test_dynamic_inf_poisons_its_group_and_nvfp4_the_tensor():
    x = torch.randn(4, 32)
    x[1, 3] = float("inf")
    for kwargs in ({"num_bits": 8}, {"num_bits": (4, 3), "scale_bits": (8, 0)}):
        y = qk.fake_quantize(x, block_sizes={-1: 16}, **kwargs)
        assert torch.isnan(y[1, :16]).all() and not torch.isnan(y[1, 16:]).any(), kwargs
        assert not torch.isnan(y[[0, 2, 3]]).any()
    y = qk.fake_quantize(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert torch.isnan(y).all()  # the global amax is inf too


def test_e8m0_powers_of_two_are_exact_down_to_the_smallest_subnormal():
    """The reference builds 2**unit from bits (CUDA's exp2 is one ulp off for some subnormals)."""
    from quant_kernels.reference import _pow2

    unit = torch.arange(-149, 128, dtype=torch.int32)
    expected = torch.tensor([2.0 ** int(k) for k in unit], dtype=torch.float64)
    assert torch.equal(_pow2(unit).double(), expected)

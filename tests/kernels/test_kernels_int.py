"""INT fake quantization (2..8 bits; per-tensor, per-channel, block-wise, dynamic) against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from kernels_refs import int_fake_quant64, int_range

import quant_kernels as qk


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("unsigned", "narrow"), [(False, False), (False, True), (True, False)])
def test_int_per_tensor_static_matches_float64(bits, unsigned, narrow):
    torch.manual_seed(bits)
    x = torch.randn(40, 50) * 2
    amax = torch.tensor(1.7)
    y = qk.fake_quantize(x, bits, amax=amax, unsigned=unsigned, narrow_range=narrow)
    assert torch.equal(y.double(), int_fake_quant64(x, amax, bits, unsigned, narrow))


def test_int8_ties_round_half_to_even():
    """amax = 127 * 2**-4 makes the scale exactly 2**-4, so k.5 steps are exact ties."""
    scale = 2.0**-4
    amax = torch.tensor(127 * scale)
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -127.5])
    y = qk.fake_quantize(halves * scale, 8, amax=amax)
    assert (y / scale).tolist() == [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 126.0, -128.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_int_values_at_plus_minus_amax_and_beyond(bits):
    amax = torch.tensor(0.37)
    qmin, qmax = int_range(bits, False, False)
    scale = torch.tensor(0.37 / qmax).float()
    x = torch.tensor([0.37, -0.37, 5.0, -5.0, 1e38, -1e38, float("inf"), float("-inf"), 0.0])
    y = qk.fake_quantize(x, bits, amax=amax)
    assert y[0] == qmax * scale and y[1] == -qmax * scale
    assert y[2] == y[4] == y[6] == qmax * scale
    assert y[3] == y[5] == y[7] == qmin * scale  # full range: the extra negative code
    assert y[8] == 0


def test_int_nan_stays_nan_static():
    x = torch.tensor([float("nan"), 1.0, -1.0])
    y = qk.fake_quantize(x, 8, amax=torch.tensor(2.0))
    assert torch.isnan(y[0]) and not torch.isnan(y[1:]).any()


def test_int_dynamic_nan_poisons_only_its_block():
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    y = qk.fake_quantize(x, 4, block_sizes={-1: 32})
    assert torch.isnan(y[1, :32]).all()
    assert not torch.isnan(y[1, 32:]).any() and not torch.isnan(y[[0, 2, 3]]).any()


def test_zero_amax_and_all_zero_blocks_give_zeros():
    x = torch.randn(3, 64)
    assert torch.equal(qk.fake_quantize(x, 8, amax=torch.tensor(0.0)), torch.zeros_like(x))
    x[1] = 0
    y = qk.fake_quantize(x, 4, block_sizes={-1: 16})
    assert torch.equal(y[1], torch.zeros(64)) and not torch.isnan(y).any()
    for kw in (
        {"num_bits": (2, 1), "scale_bits": (4, 3)},
        {"num_bits": (4, 3), "scale_bits": (8, 0)},
    ):
        y = qk.fake_quantize(torch.zeros(2, 32), block_sizes={-1: 16}, **kw)
        assert torch.equal(y, torch.zeros(2, 32))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_int8_per_channel_static(axis):
    torch.manual_seed(5)
    x = torch.randn(12, 20)
    amax = qk.reduce_amax(x, axis=axis) * 0.8  # some values clip
    assert amax.shape == ((12, 1) if axis == 0 else (1, 20))
    y = qk.fake_quantize(x, 8, amax=amax)
    assert torch.equal(y.double(), int_fake_quant64(x, amax, 8))


@pytest.mark.parametrize(("bits", "block"), [(4, 128), (4, 64), (8, 32), (3, 16), (2, 8)])
def test_int_block_dynamic_matches_float64(bits, block):
    torch.manual_seed(block)
    x = torch.randn(16, 256) * torch.rand(16, 1) * 10
    y = qk.fake_quantize(x, bits, block_sizes={-1: block})
    xb = x.reshape(16, 256 // block, block)
    want = int_fake_quant64(xb, xb.abs().amax(-1, keepdim=True), bits).reshape(16, 256)
    assert torch.equal(y.double(), want)


def test_int4_block_static_amax_roundtrips_reduce_amax():
    torch.manual_seed(6)
    x = torch.randn(8, 256)
    amax = qk.reduce_amax(x, block_sizes={-1: 128})
    assert amax.shape == (8, 2)
    dynamic = qk.fake_quantize(x, 4, block_sizes={-1: 128})
    assert torch.equal(qk.fake_quantize(x, 4, amax=amax, block_sizes={-1: 128}), dynamic)
    # ModelOpt's (groups, 1) layout and a flat layout are the same values
    assert torch.equal(
        qk.fake_quantize(x, 4, amax=amax.reshape(16, 1), block_sizes={-1: 128}), dynamic
    )


def test_block_sizes_along_several_axes():
    torch.manual_seed(7)
    x = torch.randn(6, 32, 48)
    y = qk.fake_quantize(x, 8, block_sizes={1: 16, 2: 16})
    xb = x.reshape(6, 2, 16, 3, 16)
    want = int_fake_quant64(xb, xb.abs().amax(dim=(2, 4), keepdim=True), 8).reshape(6, 32, 48)
    assert torch.equal(y.double(), want)
    assert qk.reduce_amax(x, block_sizes={1: 16, 2: 16}).shape == (6, 2, 3)


def test_block_size_that_does_not_divide_pads_with_zeros():
    """Documented: the axis is zero-padded to a multiple of the block; the last block is short."""
    torch.manual_seed(8)
    x = torch.randn(5, 100)
    y = qk.fake_quantize(x, 4, block_sizes={-1: 32})
    blocks = [x[:, i : i + 32] for i in range(0, 100, 32)]  # 32, 32, 32, 4
    want = torch.cat(
        [int_fake_quant64(b, b.abs().amax(-1, keepdim=True), 4) for b in blocks], dim=1
    )
    assert torch.equal(y.double(), want)
    assert qk.reduce_amax(x, block_sizes={-1: 32}).shape == (5, 4)


def test_per_token_dynamic_int8():
    torch.manual_seed(9)
    x = torch.randn(2, 7, 33)
    y = qk.fake_quantize(x, 8, block_sizes={-1: None})
    assert torch.equal(y.double(), int_fake_quant64(x, x.abs().amax(-1, keepdim=True), 8))


def test_dynamic_per_tensor_default():
    x = torch.randn(10, 10)
    assert torch.equal(qk.fake_quantize(x, 8).double(), int_fake_quant64(x, x.abs().max(), 8))


def test_reduce_amax_shapes_and_values():
    x = torch.randn(4, 6, 8)
    assert qk.reduce_amax(x).shape == () and qk.reduce_amax(x) == x.abs().max()
    assert torch.equal(qk.reduce_amax(x, axis=1), x.abs().amax(dim=(0, 2), keepdim=True))
    assert torch.equal(qk.reduce_amax(x, axis=(0, 2)), x.abs().amax(dim=1, keepdim=True))
    assert torch.equal(qk.reduce_amax(x, block_sizes={-1: None}), x.abs().amax(-1, keepdim=True))
    half = x.to(torch.bfloat16)
    assert qk.reduce_amax(half).dtype == torch.float32


def test_reduce_amax_nan_marks_only_its_group():
    x = torch.ones(3, 8)
    x[1, 2] = float("nan")
    amax = qk.reduce_amax(x, block_sizes={-1: 4})
    assert torch.isnan(amax[1, 0]) and not torch.isnan(amax[[0, 2]]).any() and amax[1, 1] == 1


def test_all_zero_groups_give_positive_zero_amax_and_outputs():
    """-0.0 inputs must not make a -0.0 amax (which would flip the sign of every output in the group)."""
    x = torch.zeros(2, 32)
    x[0] = -0.0
    assert not torch.signbit(qk.reduce_amax(x, block_sizes={-1: 16})).any()
    assert not torch.signbit(qk.reduce_amax(x)).any()
    for kwargs in ({"num_bits": 8}, {"num_bits": 4, "block_sizes": {-1: 16}}, {"num_bits": (4, 3)}):
        y = qk.fake_quantize(x, **kwargs)
        assert not torch.signbit(y).any(), kwargs  # documented: zeros come out +0

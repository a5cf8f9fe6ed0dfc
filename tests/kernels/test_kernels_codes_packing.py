"""Real codes + scales for export, and INT4 / E2M1 / E8M0 packing, against torch's native dtypes and the specs."""

from __future__ import annotations

import pytest
import torch
from kernels_refs import E2M1_POSITIVE

import quant_kernels as qk

CASES = [
    {"num_bits": 8},
    {"num_bits": 8, "block_sizes": {-1: None}},
    {"num_bits": 4, "block_sizes": {-1: 32}},
    {"num_bits": 4, "block_sizes": {-1: 32}, "unsigned": True},
    {"num_bits": 4, "block_sizes": {-1: 48}},  # pads
    {"num_bits": (4, 3)},
    {"num_bits": (5, 2), "block_sizes": {-1: None}},
    {"num_bits": (4, 3), "block_sizes": {-1: 32, -2: 8}},
    {"num_bits": (3, 2), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": (2, 3), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)},
    {"num_bits": (2, 1), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": 8, "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
]


@pytest.mark.parametrize("kwargs", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_codes_equal_fake_quant_bit_for_bit(kwargs, dtype):
    torch.manual_seed(13)
    x = (torch.randn(16, 96) * 4).to(dtype)
    if kwargs.get("unsigned"):
        x = x.abs()
    qt = qk.quantize_to_codes(x, **kwargs)
    assert qt.codes.shape == x.shape
    assert qt.scale.numel() == qk.reduce_amax(x, block_sizes=kwargs.get("block_sizes")).numel()
    assert torch.equal(qk.dequantize_codes(qt), qk.fake_quantize(x, **kwargs))


def test_int8_codes_are_round_x_over_scale():
    x = torch.tensor([[0.5, -1.0, 0.26, 2.0]])
    qt = qk.quantize_to_codes(x, 8, amax=torch.tensor(1.0))
    assert qt.codes.dtype == torch.int8 and qt.codes.tolist() == [[64, -127, 33, 127]]
    assert qt.scale.item() == pytest.approx(1 / 127)


def test_fp8_codes_are_native_float8():
    x = torch.randn(4, 8)
    qt = qk.quantize_to_codes(x, (4, 3), amax=torch.tensor(448.0))
    assert qt.codes.dtype == torch.float8_e4m3fn
    assert torch.equal(qt.codes.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e2m1_codes_follow_spec_bit_layout():
    """E2M1 code = sign<<3 | exponent<<1 | mantissa, so code i (i < 8) has value E2M1_POSITIVE[i]."""
    values = torch.tensor([[*E2M1_POSITIVE, *[-v for v in E2M1_POSITIVE]]])
    values[0, 8] = -0.0
    qt = qk.quantize_to_codes(values, (2, 1), amax=torch.tensor(6.0))
    assert qt.codes.tolist() == [list(range(16))]


def test_fp_codes_of_small_negatives_are_minus_zero():
    x = torch.tensor([[-0.1, 0.1, -0.0, 0.0, -448.0, 1.0]])
    e2m1 = qk.quantize_to_codes(x, (2, 1), amax=torch.tensor(6.0))
    assert e2m1.codes.tolist() == [[8, 0, 8, 0, 0xF, 2]]
    fp8 = qk.quantize_to_codes(x * 1e-3, (4, 3), amax=torch.tensor(448.0))
    assert fp8.codes.view(torch.uint8)[0, :4].tolist() == [0x80, 0x00, 0x80, 0x00]


def test_nvfp4_export_pieces():
    torch.manual_seed(14)
    x = torch.randn(4, 64)
    qt = qk.quantize_to_codes(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert qt.scale.dtype == torch.float8_e4m3fn and qt.scale.shape == (4, 4)
    assert qt.global_scale.item() == pytest.approx(x.abs().max().item() / (6 * 448), rel=1e-6)
    packed = qt.packed_codes()
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (4, 32)
    assert torch.equal(qk.unpack_fp4(packed), qt.codes)


def test_pack_int4_layout_low_nibble_first():
    codes = torch.tensor([[-8, 7, 0, -1, 3, -3]], dtype=torch.int8)
    packed = qk.pack_int4(codes)
    # two's complement nibbles: -8=0x8, 7=0x7, 0=0x0, -1=0xF, 3=0x3, -3=0xD; element 2i in the low nibble
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x78, 0xF0, 0xD3]]
    assert torch.equal(qk.unpack_int4(packed), codes)
    unsigned = torch.tensor([[15, 0, 9, 1]], dtype=torch.uint8)
    assert torch.equal(qk.unpack_int4(qk.pack_int4(unsigned), signed=False), unsigned)


def test_pack_fp4_matches_float4_e2m1fn_x2_layout():
    """torch.float4_e2m1fn_x2 stores element 2i in bits 0-3 and 2i+1 in bits 4-7 of byte i."""
    codes = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
    packed = qk.pack_fp4(codes)
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (2, 4)
    raw = packed.view(torch.uint8)
    assert raw.tolist() == [[0x10, 0x32, 0x54, 0x76], [0x98, 0xBA, 0xDC, 0xFE]]
    assert torch.equal(qk.unpack_fp4(packed), codes)


def test_packing_refuses_odd_length_and_out_of_range():
    with pytest.raises(ValueError, match="even"):
        qk.pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 15\]"):
        qk.pack_int4(torch.tensor([16, 0]))
    with pytest.raises(ValueError, match="uint8"):
        qk.pack_fp4(torch.zeros(2, dtype=torch.int8))


def test_int4_packed_roundtrip_random():
    torch.manual_seed(15)
    codes = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    assert torch.equal(qk.unpack_int4(qk.pack_int4(codes)), codes)


def test_e8m0_matches_torch_native_dtype():
    exps = torch.arange(-127, 128)
    e8 = qk.exponent_to_e8m0(exps)
    assert e8.dtype == torch.float8_e8m0fnu
    assert torch.equal(qk.e8m0_to_float(e8).double(), torch.exp2(exps.double()))
    assert torch.equal(qk.e8m0_to_float(e8), e8.float())  # torch's own decoding
    assert torch.isnan(qk.e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()
    with pytest.raises(ValueError, match="128"):
        qk.exponent_to_e8m0(torch.tensor([128]))


def test_codes_refuse_nan_for_int():
    with pytest.raises(ValueError, match="NaN"):
        qk.quantize_to_codes(torch.tensor([float("nan"), 1.0]), 8, amax=torch.tensor(1.0))

"""The format table and element formats against the OCP spec's constants and torch's native dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from kernels_refs import E2M1_POSITIVE, FP_MAX, fp_positive_values

import quant_kernels as qk


@pytest.mark.parametrize(
    ("pair", "dtype"), [((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2)]
)
def test_fp8_values_match_torch_for_all_256_codes(pair, dtype):
    ours = qk.ElementFormat.parse(pair).values()
    native = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    assert torch.equal(torch.isnan(ours), torch.isnan(native))
    finite = ~torch.isnan(native)
    assert torch.equal(ours[finite], native[finite])


def test_e2m1_values_are_the_spec_table():
    values = qk.ElementFormat.parse((2, 1)).values().tolist()
    assert values[:8] == E2M1_POSITIVE
    assert values[8:] == [-v for v in E2M1_POSITIVE]


@pytest.mark.parametrize("pair", [(3, 2), (2, 3)])
def test_fp6_values_follow_the_spec_formula(pair):
    values = qk.ElementFormat.parse(pair).values()
    half = len(values) // 2
    assert values[:half].tolist() == fp_positive_values(*pair)
    assert values[half:].tolist() == [-v for v in fp_positive_values(*pair)]


@pytest.mark.parametrize("pair", list(FP_MAX))
def test_fp_max_values(pair):
    fmt = qk.ElementFormat.parse(pair)
    assert fmt.max_value == FP_MAX[pair]
    assert fmt.max_value == max(v for v in fmt.values().tolist() if math.isfinite(v))


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_ranges(bits):
    fmt = qk.ElementFormat.parse(bits)
    assert fmt.int_range() == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert fmt.int_range(narrow_range=True) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert qk.ElementFormat.parse(bits, unsigned=True).int_range() == (0, 2**bits - 1)


@pytest.mark.parametrize("bad", [1, 17, 0, True, (4, 4), (3, 3), "8", None])
def test_parse_rejects_unknown_num_bits(bad):
    with pytest.raises(ValueError, match="num_bits"):
        qk.ElementFormat.parse(bad)


def test_unsigned_fp_is_refused():
    with pytest.raises(ValueError, match="unsigned"):
        qk.ElementFormat.parse((4, 3), unsigned=True)


def test_format_table_rows_are_consistent():
    assert {"INT8", "INT4", "FP8", "NVFP4", "MXFP8", "MXFP4", "MXINT8", "FP8_BLOCK"} <= set(
        qk.FORMATS
    )
    for name, spec in qk.FORMATS.items():
        assert spec.name == name
        assert spec.element.num_bits == spec.num_bits
        kwargs = spec.fake_quantize_kwargs()
        y = qk.fake_quantize(torch.randn(4, 256), **kwargs)  # every row runs as a dynamic quantizer
        assert y.shape == (4, 256)
    nvfp4 = qk.FORMATS["NVFP4"]
    assert (nvfp4.block_size, nvfp4.scale_bits, nvfp4.effective_bits) == (16, (4, 3), 4.5)
    assert qk.FORMATS["MXFP4"].effective_bits == 4.25
    assert qk.FORMATS["INT4"].effective_bits == 4 + 16 / 128
    assert qk.FORMATS["FP8"].effective_bits == 8


def test_format_table_is_read_only():
    with pytest.raises(TypeError):
        qk.FORMATS["NEW"] = qk.FORMATS["FP8"]

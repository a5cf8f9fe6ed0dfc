"""QuantFormat: a quantizer's attributes parsed once into a format value that names its table row."""

from __future__ import annotations

import pytest
import torch

import quant_kernels as qk
from quant_kernels import QuantFormat


def _row_attributes(row: qk.FormatSpec) -> dict:
    blocks = dict(row.block_sizes or {})
    if row.scale_bits:
        blocks["scale_bits"] = row.scale_bits
    return {"num_bits": row.num_bits, "axis": row.axis, "block_sizes": blocks or None}


@pytest.mark.parametrize("name", list(qk.FORMATS))
def test_each_row_parses_back_to_itself(name):
    row = qk.FORMATS[name]
    fmt = QuantFormat.parse(**_row_attributes(row))
    assert fmt.row is row and fmt.name == name
    assert (fmt.num_bits, fmt.scale_bits, fmt.onnx_dtype) == (
        row.num_bits,
        row.scale_bits,
        row.onnx_dtype,
    )
    assert fmt.effective_bits == row.effective_bits
    assert fmt.trtllm_quant_algo == row.trtllm_quant_algo


def test_granularity_picks_the_row_and_formats_outside_the_table_have_none():
    per_token = QuantFormat.parse((4, 3), block_sizes={-1: None, "type": "dynamic"})
    assert per_token.dynamic and per_token.name == "FP8_PER_CHANNEL"
    assert QuantFormat.parse((4, 3)).name == "FP8"
    assert QuantFormat.parse(8).name == "INT8"  # per-tensor INT8 activations share the INT8 row
    unsigned = QuantFormat.parse(8, unsigned=True)
    assert unsigned.row is None and unsigned.name == "UINT8" and unsigned.onnx_dtype == "UINT8"
    nv32 = QuantFormat.parse((2, 1), block_sizes={-1: 32, "scale_bits": (4, 3), "type": "dynamic"})
    assert nv32.row is None and nv32.label == "NVFP4 (block 32)"
    assert nv32.effective_bits == 4 + 8 / 32  # E2M1 codes plus one 8-bit E4M3 scale per 32
    assert nv32.storage_dtype == "float4_e2m1fn_x2" and nv32.trtllm_quant_algo is None
    assert QuantFormat.parse(4, block_sizes={-1: 32}).effective_bits == 4 + 16 / 32


def test_labels_of_the_summary():
    cases = [
        (8, None, None, "INT8"),
        ((4, 3), None, None, "FP8 E4M3"),
        ((5, 2), 0, None, "FP8 E5M2"),
        ((2, 1), None, {-1: 16, "scale_bits": (4, 3)}, "NVFP4"),
        ((3, 2), None, {-1: 32, "scale_bits": (8, 0)}, "MXFP6"),
        (8, None, {-1: 32, "scale_bits": (8, 0)}, "MXINT8"),
    ]
    for bits, axis, blocks, label in cases:
        assert QuantFormat.parse(bits, axis, blocks).label == label


def test_parse_is_cached_frozen_and_hashable():
    a = QuantFormat.parse((2, 1), block_sizes={-1: 16, "scale_bits": [4, 3]})
    b = QuantFormat.parse((2, 1), block_sizes={-1: 16, "scale_bits": (4, 3)})
    assert a is b and {a: 1}[b] == 1 and a.has_global_amax
    with pytest.raises(AttributeError):
        a.dynamic = True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_sizes": {-1: 16, "scale_bits": (4, 4)}}, "scale_bits"),
        ({"block_sizes": {"scale_bits": (8, 0)}}, "needs block_sizes"),
        ({"block_sizes": {-1: 16, "bogus": 1}}, "bogus"),
        ({"type": "sometimes"}, "type"),
        ({"num_bits": (3, 3)}, "num_bits"),
    ],
)
def test_bad_attributes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantFormat.parse(**kwargs)


def test_the_one_nvfp4_global_amax_rule():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    block_amax = qk.reduce_amax(x, block_sizes={-1: 16})
    assert qk.nvfp4_global_amax(block_amax=block_amax) == x.abs().max()
    assert qk.nvfp4_global_amax(calibrated=torch.tensor([3.0])) == 3.0
    assert qk.nvfp4_global_amax(x=x) == x.abs().max()
    assert qk.nvfp4_global_amax() is None
    static = QuantFormat.parse((2, 1), block_sizes={-1: 16, "scale_bits": (4, 3)})
    dynamic = QuantFormat.parse(
        (2, 1), block_sizes={-1: 16, "scale_bits": (4, 3), "type": "dynamic"}
    )
    assert static.global_amax(block_amax) == x.abs().max()
    assert dynamic.global_amax(torch.tensor(2.0), x) == 2.0  # the calibrated global amax wins
    assert dynamic.global_amax(None, x) == x.abs().max()
    assert QuantFormat.parse((4, 3)).global_amax(block_amax, x) is None
    # the kernels apply the same rule when no global amax is passed
    implicit = qk.fake_quantize_format(x, static, block_amax)
    explicit = qk.fake_quantize_format(x, static, block_amax, global_amax=x.abs().max())
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize("bits", [8, 4, (4, 3), (2, 1)])
def test_grid_primitive_equals_fake_quantize_for_many_amaxes_at_once(bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=gen)
    amax = x.abs().amax(-1, keepdim=True) * torch.linspace(0.5, 1.0, 5).view(
        5, 1, 1
    )  # 5 candidates
    fmt = QuantFormat.parse(bits, axis=0)
    got = qk.fake_quantize_grid(x, amax, fmt)
    for i in range(5):
        assert torch.equal(got[i], qk.fake_quantize(x, bits, amax=amax[i]))
    with pytest.raises(ValueError, match="e4m3 scales"):
        qk.fake_quantize_grid(
            x, amax, QuantFormat.parse((2, 1), block_sizes={-1: 16, "scale_bits": (4, 3)})
        )


def test_format_maxima_and_scale_modes_come_from_the_table():
    # OCP MX spec v1.0: E4M3 max normal 448 (S.1111.110), E2M1 max 6 (S.11.1)
    assert qk.E4M3_MAX == 448.0 and qk.E2M1_MAX == 6.0
    assert float(torch.finfo(torch.float8_e4m3fn).max) == qk.E4M3_MAX
    modes = {
        name: QuantFormat.parse(
            row.num_bits, row.axis, {**(row.block_sizes or {}), "scale_bits": row.scale_bits}
        ).scale_mode
        for name, row in qk.FORMATS.items()
    }
    assert modes["NVFP4"] is qk.ScaleMode.E4M3
    assert modes["MXFP8"] is modes["MXINT8"] is qk.ScaleMode.E8M0
    assert modes["INT8"] is modes["FP8"] is modes["INT4"] is qk.ScaleMode.FLOAT32
    # per scale storage: 8-bit E4M3 / E8M0 scales, float32 otherwise
    assert [m.storage_bits for m in qk.ScaleMode] == [32, 8, 8]

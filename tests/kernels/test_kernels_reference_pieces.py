"""The CPU reference works piece by piece (cache-sized); the result must not depend on the cut.

Small pieces force every way of cutting (rows, parts of rows, blocks of a 2-D grid, groups that
span pieces); one piece is the arithmetic applied to the whole tensor at once, as it was before the
reference worked in pieces. The FP grid rounding (``v + alpha * p``) is checked against the
two-step form it replaced and against a float64 table reference on every grid midpoint.
"""

from __future__ import annotations

import pytest
import torch
from kernels_refs import FORMAT_CASES, FP_MAX, fp_positive_values, round_to_table, same_bits

import quant_kernels as qk
from quant_kernels import reference
from quant_kernels.formats import ElementFormat

CASES = [
    *FORMAT_CASES,
    {"num_bits": 8, "block_sizes": {0: None}},  # per column, dynamic: groups along the first dim
    {"num_bits": 4, "block_sizes": {-1: 48}},  # padded
    {"num_bits": (2, 1), "block_sizes": {-1: 8}, "scale_bits": (4, 3)},
]


def _input(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 192, generator=gen) * torch.logspace(-30, 4, 48).view(48, 1)
    x[3, 7] = float("nan")
    x[5, 1] = float("inf")
    x[7] = 0.0
    x[9, :3] = torch.tensor([-0.0, 1e-40, -1e-42])
    return x.to(dtype)


def _kwargs(case: dict, x: torch.Tensor, static: bool) -> dict:
    kwargs = dict(case)
    axis = kwargs.pop("axis", None)
    if static or axis is not None:
        finite = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        kwargs["amax"] = qk.reduce_amax(finite, axis=axis, block_sizes=kwargs.get("block_sizes"))
        kwargs["amax"] = kwargs["amax"] * 0.7
    return kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_in_pieces_equals_one_piece(case, static, dtype, monkeypatch):
    x = _input(dtype)
    kwargs = _kwargs(case, x, static)
    x.requires_grad_()
    monkeypatch.setattr(reference, "_PIECE", 2**40)
    whole = qk.fake_quantize(x, backend="reference", **kwargs)
    (grad_whole,) = torch.autograd.grad(whole.sum(), x)
    for piece in (100, 1000):  # parts of rows, and several rows per piece
        monkeypatch.setattr(reference, "_PIECE", piece)
        cut = qk.fake_quantize(x, backend="reference", **kwargs)
        assert same_bits(cut, whole), piece
        assert torch.equal(torch.autograd.grad(cut.sum(), x)[0], grad_whole)


@pytest.mark.parametrize("pair", sorted(FP_MAX))
def test_fp_grid_rounding_equals_two_step_form_and_float64(pair):
    element = ElementFormat.parse(pair)
    positive = fp_positive_values(*pair)
    grid = torch.tensor(positive, dtype=torch.float64)
    midpoints = (grid[1:] + grid[:-1]) / 2
    gen = torch.Generator().manual_seed(len(positive))
    magnitudes = torch.rand(200_000, generator=gen, dtype=torch.float64) * FP_MAX[pair]
    tiny = torch.rand(20_000, generator=gen, dtype=torch.float64) * 2.0 * positive[1]
    v64 = torch.cat([grid, midpoints, magnitudes, tiny])
    v64 = torch.cat([v64, -v64]).float().double()  # values float32 can hold
    new = reference.round_to_grid_(v64.float(), element)
    # the two-step form: c = max(2**floor(log2|v|), min normal) * 1.5 * 2**(23 - m); (v + c) - c
    v = v64.float()
    c = torch.bitwise_and(v.view(torch.int32), 0x7F800000).view(torch.float32)
    c = c.clamp(min=2.0**element.min_normal_exponent) * (1.5 * 2.0 ** (23 - element.mantissa_bits))
    old = (v + c) - c
    assert torch.equal(new.view(torch.int32), old.view(torch.int32))
    expected = round_to_table(v64, positive)
    assert torch.equal(new.double(), torch.where(expected == 0, 0.0, expected))

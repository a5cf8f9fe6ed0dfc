"""The Triton two-stage amax (tiles, then each group's tiles) against float64 max |x| per group."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
        reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA) or a CUDA device",
    ),
]

# (rows, cols, group rows, group cols): per tensor, 2-D blocks of power-of-two and odd sides,
# groups wider than a tile, a tensor that no tile divides
SHAPES = [
    (70, 600, 70, 600),
    (64, 512, 32, 128),
    (70, 600, 35, 300),
    (70, 600, 10, 24),
    (8, 2048, 8, 1024),
    (5, 3, 5, 3),
]


def _expected(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    rows, cols = x.shape
    blocks = x.double().abs().reshape(rows // gh, gh, cols // gw, gw)
    amax = blocks.amax(dim=(1, 3))
    nan = torch.isnan(x).reshape(rows // gh, gh, cols // gw, gw).any(dim=3).any(dim=1)
    return torch.where(nan, float("nan"), amax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_two_stage_amax_equals_float64_max_per_group(shape, dtype):
    from quant_kernels.triton_kernels import _group_amax_2d

    rows, cols, gh, gw = shape
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-20, 3, rows).view(rows, 1)
    x[0, 0] = float("nan")
    x[rows - 1, cols - 1] = float("-inf")
    x[rows // 2, :] = -0.0  # all-negative-zero groups give +0
    x = x.to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = _group_amax_2d(x.to(device), rows, cols, gh, gw).cpu()
    expected = _expected(x, gh, gw)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(got[finite].double(), expected[finite])
    assert not torch.signbit(got[finite]).any()

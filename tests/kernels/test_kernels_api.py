"""The dispatcher's contract: argument errors, dtypes, shapes, non-contiguous input and straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from kernels_refs import int_range

import quant_kernels as qk


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_amax_raises_naming_it(bad):
    with pytest.raises(ValueError, match="amax"):
        qk.fake_quantize(torch.randn(4), 8, amax=torch.tensor(bad))
    with pytest.raises(ValueError, match="amax"):
        qk.fake_quantize(torch.randn(4, 2), 8, amax=torch.tensor([[1.0], [1.0], [bad], [1.0]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -2.0])
def test_bad_global_amax_raises_naming_it(bad):
    with pytest.raises(ValueError, match="global_amax"):
        qk.fake_quantize(
            torch.randn(2, 16), (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3), global_amax=bad
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_bits": 17}, "num_bits"),
        ({"num_bits": (4, 4)}, "num_bits"),
        ({"num_bits": (4, 3), "unsigned": True}, "unsigned"),
        ({"num_bits": 8, "block_sizes": {5: 16}}, "axis"),
        ({"num_bits": 8, "block_sizes": {-1: 0}}, r"block_sizes\[-1\]"),
        ({"num_bits": 8, "block_sizes": {"bogus": 1, -1: 4}}, "bogus"),
        ({"num_bits": 8, "block_sizes": [16]}, "dict"),
        ({"num_bits": 4, "scale_bits": (8, 0)}, "block_sizes"),
        ({"num_bits": 4, "block_sizes": {-1: 8}, "scale_bits": (5, 2)}, "scale_bits"),
        ({"num_bits": 8, "global_amax": 1.0}, "global_amax"),
        ({"num_bits": 8, "amax": torch.ones(3, 1)}, r"amax of shape \(3, 1\)"),
        ({"num_bits": 8, "amax": torch.ones(5), "block_sizes": {-1: 4}}, "amax of shape"),
        ({"num_bits": 8, "backend": "cuda-magic"}, "backend"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qk.fake_quantize(torch.randn(4, 8), **kwargs)


def test_float64_and_int_inputs_are_refused():
    with pytest.raises(ValueError, match="float64"):
        qk.fake_quantize(torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="int"):
        qk.fake_quantize(torch.ones(4, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_bits": 8},
        {"num_bits": 4, "block_sizes": {-1: 16}},
        {"num_bits": (4, 3), "block_sizes": {-1: None}},
        {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)},
    ],
    ids=str,
)
def test_dtype_and_shape_preserved_and_equal_to_fp32_compute(dtype, kwargs):
    torch.manual_seed(16)
    x = torch.randn(3, 5, 32).to(dtype)
    y = qk.fake_quantize(x, **kwargs)
    assert y.dtype == dtype and y.shape == x.shape
    # the arithmetic is float32 whatever the dtype: same as quantizing the float32 copy, then casting
    assert torch.equal(y, qk.fake_quantize(x.float(), **kwargs).to(dtype))


def test_non_contiguous_input_matches_contiguous():
    torch.manual_seed(17)
    base = torch.randn(64, 48)
    x = base.t()  # (48, 64), non-contiguous
    assert not x.is_contiguous()
    for kwargs in (
        {"num_bits": 4, "block_sizes": {-1: 16}},
        {"num_bits": 8, "amax": torch.rand(48, 1)},
    ):
        assert torch.equal(
            qk.fake_quantize(x, **kwargs), qk.fake_quantize(x.contiguous(), **kwargs)
        )
    sliced = torch.randn(10, 40)[:, ::2]
    assert torch.equal(qk.fake_quantize(sliced, 8), qk.fake_quantize(sliced.contiguous(), 8))


def test_scalar_and_1d_inputs():
    assert qk.fake_quantize(torch.tensor(0.3), 8, amax=1.0).shape == ()
    assert qk.fake_quantize(torch.randn(7), 4, block_sizes={-1: 4}).shape == (7,)


def test_empty_input_gives_empty_output():
    for kwargs in (
        {"num_bits": 8},
        {"num_bits": 4, "block_sizes": {-1: 16}},
        {"num_bits": 8, "amax": 1.0},
    ):
        assert qk.fake_quantize(torch.empty(0, 16), **kwargs).shape == (0, 16)


def test_input_is_not_modified():
    x = torch.randn(8, 32)
    before = x.clone()
    qk.fake_quantize(x, 4, block_sizes={-1: 16})
    qk.fake_quantize(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
    assert torch.equal(x, before)


@pytest.mark.parametrize(("unsigned", "narrow"), [(False, False), (False, True), (True, False)])
def test_ste_gradient_passes_inside_the_clip_range_only(unsigned, narrow):
    torch.manual_seed(18)
    amax = 1.5
    x = (torch.randn(200) * 2).requires_grad_()
    y = qk.fake_quantize(x, 8, amax=torch.tensor(amax), unsigned=unsigned, narrow_range=narrow)
    g = torch.randn(200)
    y.backward(g)
    qmin, qmax = int_range(8, unsigned, narrow)
    scale = torch.tensor(amax / qmax, dtype=torch.float32)
    v = (x.detach() / scale).double()  # one float32 division, as the forward
    inside = (v >= qmin - 0.5) & (v <= qmax + 0.5)  # would round to an end code anyway
    assert 0 < inside.sum() < 200
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros(())))


def test_ste_zero_amax_gives_zero_gradient():
    x = torch.randn(10, requires_grad=True)
    qk.fake_quantize(x, 8, amax=torch.tensor(0.0)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(10))


def test_ste_block_and_fp_grad():
    torch.manual_seed(19)
    x = torch.randn(4, 32)
    amax = torch.full((4, 2), 0.8)
    xr = x.clone().requires_grad_()
    qk.fake_quantize(xr, (4, 3), amax=amax, block_sizes={-1: 16}).sum().backward()
    # E4M3's top step is 32 (416 -> 448), so |x| / (0.8 / 448) <= 448 + 16 passes
    v = (x / torch.tensor(0.8 / 448, dtype=torch.float32)).abs()
    assert torch.equal(xr.grad, (v <= 464).float())
    assert 0 < xr.grad.sum() < x.numel()
    # dynamic: every value lies inside its own block's range (MX's ceil rule too)
    for kwargs in (
        {"num_bits": 4},
        {"num_bits": (2, 1), "scale_bits": (8, 0)},
        {"num_bits": (4, 3)},
    ):
        xr = (torch.randn(64, 64) * torch.logspace(-3, 3, 64)).requires_grad_()
        qk.fake_quantize(xr, block_sizes={-1: 16}, **kwargs).sum().backward()
        assert torch.equal(xr.grad, torch.ones_like(xr)), kwargs


def test_ste_gradient_dtype_bf16_and_no_amax_grad():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    amax = torch.tensor(1.0, requires_grad=True)
    y = qk.fake_quantize(x, 8, amax=amax)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and amax.grad is None


def test_no_grad_path_saves_nothing():
    x = torch.randn(4, 16, requires_grad=True)
    with torch.no_grad():
        y = qk.fake_quantize(x, 8)
    assert y.grad_fn is None


def test_backend_listing():
    assert "reference" in qk.available_backends()


def test_reduce_amax_keeping_every_axis_gives_one_amax_per_element():
    x = torch.tensor([[-3.0, 0.5], [0.0, -0.25]])
    expected = x.double().abs()
    assert torch.equal(qk.reduce_amax(x, axis=(0, 1)).double(), expected)
    assert torch.equal(qk.reduce_amax(x[0], axis=0).double(), expected[0])

"""Triton kernels equal the reference bit for bit: on CPU under TRITON_INTERPRET=1, and on CUDA when present."""

from __future__ import annotations

import math
import os

import pytest
import torch
from kernels_refs import FORMAT_CASES as CASES
from kernels_refs import same_bits

import quant_kernels as qk

triton = pytest.importorskip("triton")
# the interpreter runs kernels in numpy, which warns on the inf/NaN inputs these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# CPU tensors can only run Triton kernels through the interpreter; with CUDA (and no
# TRITON_INTERPRET) the gpu tests below compare the compiled kernels instead.
interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)",
)


def _input(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    torch.manual_seed(20)
    x = torch.randn(32, 128) * torch.logspace(-3, 3, 32).view(32, 1)
    x[3, 7] = float("nan")  # poisons its group (dynamic) / stays NaN (static)
    x[5, 1] = float("inf")
    x[6, 2] = float("-inf")
    x[7] = 0.0  # all-zero groups
    x[8, :4] = torch.tensor([1e30, -1e30, 1e-30, -0.0])
    return x.to(dtype).to(device)


def _run(x: torch.Tensor, kwargs: dict, static: bool, backend: str) -> torch.Tensor:
    kwargs = dict(kwargs)
    axis = kwargs.pop("axis", None)
    if static or axis is not None:
        finite = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        kwargs["amax"] = (
            qk.reduce_amax(finite, axis=axis, block_sizes=kwargs.get("block_sizes")) * 0.75
        )
        if kwargs.get("scale_bits") == (4, 3):
            kwargs["global_amax"] = kwargs["amax"].max()
    return qk.fake_quantize(x, backend=backend, **kwargs)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kwargs", CASES, ids=str)
def test_triton_interpreter_equals_reference(kwargs, static, dtype):
    x = _input(dtype)
    ref = _run(x, kwargs, static, "reference")
    out = _run(x, kwargs, static, "triton")
    assert out.dtype == dtype and out.shape == x.shape
    assert same_bits(ref, out)


# (shape, kwargs): tiles and rows that do not divide the shape, and each scale shape of the tile kernel
SHAPE_CASES = [
    ((70, 600), {"num_bits": 8}),  # per tensor: one scale per tile
    ((70, 600), {"num_bits": 8, "axis": -1}),  # per column: a [1, BN] scale row per tile
    ((70, 600), {"num_bits": 8, "axis": 0}),  # per row: row kernel, last program half full
    ((6, 10, 600), {"num_bits": 8, "axis": 0}),  # 10 x 600 groups: a [BM, 1] scale column
    ((3, 20000), {"num_bits": (4, 3), "axis": 0}),  # rows too long for the row kernel
    ((70, 600), {"num_bits": (4, 3), "block_sizes": {-1: 300, -2: 35}}),  # blocks cross tiles
    ((128, 512), {"num_bits": 4, "block_sizes": {-1: 256, -2: 64}}),  # blocks hold whole tiles
    ((70, 600), {"num_bits": (2, 1), "block_sizes": {-1: 40, -2: 14}, "scale_bits": (4, 3)}),
    ((70, 600), {"num_bits": (4, 3), "block_sizes": {-1: 24, -2: 10}, "scale_bits": (8, 0)}),
    ((70, 48), {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)}),
    ((70, 96), {"num_bits": 8, "block_sizes": {-1: 32}, "scale_bits": (8, 0)}),
]


def _shaped_input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(22)
    x = torch.randn(shape) * torch.logspace(-4, 4, math.prod(shape)).reshape(shape)
    flat = x.view(-1)
    flat[[5, 17, 40]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    x.view(-1, shape[-1])[12:16] = 0.0  # all-zero rows (whole groups for row-wise plans)
    return x.to(dtype)


def _shape_params() -> list:
    """(shape, kwargs, mode): dynamic unless an axis needs an amax; e4m3 also with given global amaxes."""
    params = []
    for shape, kwargs in SHAPE_CASES:
        modes = ["static"] if "axis" in kwargs else ["dynamic", "static"]
        if kwargs.get("scale_bits") == (4, 3):
            modes += ["static-zero-gamax", "static-big-gamax"]
        params += [pytest.param(shape, kwargs, m, id=f"{shape}-{kwargs}-{m}") for m in modes]
    return params


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 or a CUDA device",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "kwargs", "mode"), _shape_params())
def test_triton_scales_and_odd_shapes(shape, kwargs, mode, dtype):
    """y and the returned scale equal the reference's, for odd shapes and zero amaxes / global
    amaxes; under the interpreter on CPU, compiled on CUDA."""
    from quant_kernels.plan import make_plan
    from quant_kernels.reference import fake_quantize_reference
    from quant_kernels.triton_kernels import fake_quantize_triton

    kwargs = dict(kwargs)
    axis = kwargs.pop("axis", None)
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    x = _shaped_input(shape, dtype).to(device)
    amax = gamax = None
    if mode != "dynamic":
        finite = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
        amax = qk.reduce_amax(finite, axis=axis, block_sizes=kwargs.get("block_sizes")) * 0.75
        if amax.numel() > 1:
            amax.view(-1)[1] = 0.0  # a zero-amax group: zeros, NaN stays NaN
        if mode == "static-zero-gamax":
            gamax = torch.tensor(0.0, device=device)
        elif mode == "static-big-gamax":
            gamax = amax.max() * 3
    plan = make_plan(
        x,
        kwargs["num_bits"],
        amax,
        kwargs.get("block_sizes"),
        kwargs.get("scale_bits"),
        gamax,
        False,
        False,
    )
    ref_y, ref_scale = fake_quantize_reference(x, plan)
    y, scale = fake_quantize_triton(x, plan)
    assert y.dtype == dtype and y.shape == x.shape and scale.shape == ref_scale.shape
    assert same_bits(ref_y, y)
    assert same_bits(ref_scale, scale)


@interpreter
def test_triton_grad_and_non_contiguous():
    torch.manual_seed(21)
    x = torch.randn(64, 32).t().requires_grad_()
    y = qk.fake_quantize(x, 4, block_sizes={-1: 16}, backend="triton")
    y.sum().backward()
    assert torch.equal(y, qk.fake_quantize(x.detach(), 4, block_sizes={-1: 16}))
    assert torch.equal(x.grad, torch.ones_like(x))


def test_cpu_tensors_use_the_reference_and_padding_falls_back():
    from quant_kernels.plan import make_plan
    from quant_kernels.triton_kernels import supports

    x = torch.randn(4, 48)
    plan = make_plan(x, 4, None, {-1: 32}, None, None, False, False)
    assert qk.select_backend(x, plan)[0] == "reference"
    assert not supports(x, plan)  # 48 is padded to 64: reference only
    assert qk.select_backend(x, plan, backend="triton")[0] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", CASES, ids=str)
def test_cuda_triton_equals_reference(kwargs, dtype):
    x = _input(dtype, "cuda")
    for static in (False, True):
        ref = _run(x, kwargs, static, "reference")
        out = _run(x, kwargs, static, "auto")
        assert same_bits(ref, out), (kwargs, static)
        assert same_bits(ref.cpu(), _run(x.cpu(), kwargs, static, "reference"))


@pytest.mark.gpu
def test_cuda_dispatch_picks_triton():
    from quant_kernels.plan import make_plan

    x = torch.randn(16, 64, device="cuda")
    plan = make_plan(x, 4, None, {-1: 32}, None, None, False, False)
    assert qk.select_backend(x, plan)[0] == "triton"

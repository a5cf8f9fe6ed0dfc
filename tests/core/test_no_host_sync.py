"""A calibrated quantizer's forward and backward never read tensor values on the host.

On CUDA such a read is a device synchronisation, which stalls every QAT step and calibration pass.
The CPU tests run the same code under `host_reads.no_host_reads` (which fails on ``.item()``,
``.tolist()``, ``bool(t)``, ops with data-dependent shapes, device-to-host copies): the Triton
kernels' host code through the interpreter on CPU tensors, and the PyTorch reference on ``meta``
tensors (the path a device without Triton takes; on CPU itself the reference may read one flag,
which costs nothing there). The gpu test runs the real thing under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from host_reads import HostRead, no_host_reads

import quant_core as mtq
import quant_kernels as qk
from quant_core.nn import TensorQuantizer

_NVFP4 = {"scale_bits": (4, 3)}
_MX = {"scale_bits": (8, 0)}
# (attributes without "type", block axes or None): every element format and granularity the
# built-in configs use; each runs static (calibrated) and dynamic.
FORMATS = {
    "int8-tensor": ({"num_bits": 8}, None),
    "int8-channel": ({"num_bits": 8, "axis": 0}, None),
    "int8-token": ({"num_bits": 8}, {-1: None}),
    "int4-block": ({"num_bits": 4}, {-1: 32}),
    "fp8-tensor": ({"num_bits": (4, 3)}, None),
    "fp8-channel": ({"num_bits": (4, 3), "axis": 0}, None),
    "fp8-token": ({"num_bits": (4, 3)}, {-1: None}),
    "e5m2-tensor": ({"num_bits": (5, 2)}, None),
    "fp8-2d-block": ({"num_bits": (4, 3)}, {-1: 32, -2: 32}),
    "nvfp4": ({"num_bits": (2, 1)}, {-1: 16, **_NVFP4}),
    "mxfp8": ({"num_bits": (4, 3)}, {-1: 32, **_MX}),
    "mxfp6": ({"num_bits": (3, 2)}, {-1: 32, **_MX}),
    "mxfp4": ({"num_bits": (2, 1)}, {-1: 32, **_MX}),
    "mxint8": ({"num_bits": 8}, {-1: 32, **_MX}),
}
# where the forward runs in these CPU tests: Triton's host code (kernels interpreted on CPU
# tensors) or the reference on meta tensors (nothing on meta can be read at all)
WHERE = {"triton": ("triton", "cpu"), "reference": ("reference", "meta")}
PLACES = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1",
            reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (CI sets it); on CUDA "
            "test_cuda_forward_does_not_synchronize covers the compiled kernels",
        ),
    ),
    "reference",
]


def _attributes(name: str, kind: str) -> dict:
    attrs, blocks = FORMATS[name]
    if blocks is None:
        return {**attrs, "type": kind}
    return {**attrs, "block_sizes": {**blocks, "type": kind}}


# dynamic 2-D blocks are not a quantizer setting (the schema refuses them)
CASES = [
    (name, kind)
    for name in sorted(FORMATS)
    for kind in ("static", "dynamic")
    if not (kind == "dynamic" and name == "fp8-2d-block")
]


def _calibrated(attrs: dict, x: torch.Tensor) -> TensorQuantizer:
    quantizer = TensorQuantizer(attrs)
    quantizer.disable_quant()
    quantizer.enable_calib()
    quantizer(x)
    quantizer.load_calib_amax()
    quantizer.disable_calib()
    quantizer.enable_quant()
    return quantizer


def _input(device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=gen) * torch.logspace(-2, 1, 128)
    return x.to(device)


def _forward_backward(quantizer: torch.nn.Module, x: torch.Tensor) -> tuple:
    x = x.detach().requires_grad_()
    y = quantizer(x)
    y.sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_calibrated_quantizer_reads_no_tensor_value_on_host(name, kind, where, monkeypatch):
    attrs = _attributes(name, kind)
    backend, device = WHERE[where]
    monkeypatch.setenv("QUANT_KERNELS_BACKEND", backend)
    x = _input()
    quantizer = _calibrated(attrs, x)
    assert (quantizer.amax is not None) == (kind == "static" or "nvfp4" in name)
    expected, _ = _forward_backward(copy.deepcopy(quantizer), x)  # outside the guard
    quantizer.to(device)
    with no_host_reads():
        y, grad = _forward_backward(quantizer, x.to(device))
    assert y.device.type == device and grad.shape == x.shape
    if device != "meta":
        assert torch.equal(y, expected)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("config", sorted(mtq.choices))
def test_builtin_config_qat_step_reads_no_tensor_value_on_host(config, where, monkeypatch):
    backend, device = WHERE[where]
    torch.manual_seed(0)
    # widths that 128-blocks divide, so the Triton kernels take every quantizer
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)
    )
    batches = [torch.randn(4, 128) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # KV-only configs enable nothing here
        mtq.quantize(model, copy.deepcopy(getattr(mtq, config)), lambda m: [m(b) for b in batches])
    model.to(device)
    monkeypatch.setenv("QUANT_KERNELS_BACKEND", backend)  # calibration ran on the reference
    with no_host_reads():
        model(batches[0].to(device)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_guard_catches_host_reads():
    """The guard fails on each kind of read it names, and on fake_quantize's own amax check."""
    t = torch.ones(4)
    reads = [
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: bool(t.any()),
        lambda: float(t[0]),
        lambda: t[t > 0],
        lambda: torch.nonzero(t),
        lambda: qk.fake_quantize(t, amax=torch.ones(())),  # validate_amax=True reads amax
    ]
    for read in reads:
        with pytest.raises(HostRead), no_host_reads():
            read()
    with no_host_reads():
        qk.fake_quantize(t, amax=torch.ones(()), validate_amax=False)


def test_fake_quantize_still_validates_amax_by_default():
    with pytest.raises(ValueError, match="finite and >= 0"):
        qk.fake_quantize(torch.ones(4), amax=torch.tensor(float("nan")))


def test_state_dict_amax_is_validated_on_load():
    quantizer = TensorQuantizer({"num_bits": 8}, amax=1.0)
    state = {"_amax": torch.tensor(-1.0)}
    with pytest.raises(ValueError, match="finite and >= 0"):
        quantizer.load_state_dict(state)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_cuda_forward_does_not_synchronize(name, kind, dtype):
    attrs = _attributes(name, kind)
    x = _input("cuda").to(dtype)
    quantizer = _calibrated(attrs, x).cuda()
    _forward_backward(quantizer, x)  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with no_host_reads():
            y, _ = _forward_backward(quantizer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, _forward_backward(quantizer, x)[0])

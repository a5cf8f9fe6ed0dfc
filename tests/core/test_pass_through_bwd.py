"""ModelOpt 0.47's ``pass_through_bwd`` and ``effective_bits`` quantizer attributes (``config.py``
``QuantizerAttributeConfig``; ``tensor_quant.py`` ``_fake_tensor_quant_backward``): gradients are
checked against masks written in float64 from the definition, costs against the value given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.nn import TensorQuantizer
from quant_core.tensor_quant import fake_tensor_quant


def _x_and_grad(shape=(4, 32), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)


def _input_grad(quantizer, x, upstream) -> torch.Tensor:
    x = x.clone().requires_grad_()
    quantizer(x).backward(upstream)
    return x.grad


def _int8_kept(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Float64: True where clamping to [-128, 127] does not change round(x / scale)."""
    v = x.double() / (amax.float() / 127).double()
    return (v >= -128.5) & (v <= 127.5)


def test_pass_through_bwd_is_the_default_and_passes_saturated_gradients() -> None:
    x, upstream = _x_and_grad()
    amax = torch.full((4, 1), 2.0)
    q = TensorQuantizer({"num_bits": 8, "axis": 0}, amax=amax)
    assert q.attribute_config.pass_through_bwd is True  # ModelOpt's default
    assert not _int8_kept(x, amax).all()  # some values saturate
    assert torch.equal(_input_grad(q, x, upstream), upstream)


def test_pass_through_bwd_false_zeroes_gradients_of_saturated_values() -> None:
    x, upstream = _x_and_grad(seed=1)
    amax = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    q = TensorQuantizer({"num_bits": 8, "axis": 0, "pass_through_bwd": False}, amax=amax)
    expected = torch.where(_int8_kept(x, amax), upstream.double(), 0.0).float()
    assert torch.equal(_input_grad(q, x, upstream), expected)


@pytest.mark.parametrize("pass_through", [True, False])
def test_nvfp4_static_gradient_follows_pass_through_bwd(pass_through: bool) -> None:
    x, upstream = _x_and_grad((2, 32), seed=2)
    attrs = {"num_bits": (2, 1), "block_sizes": {-1: 16, "scale_bits": (4, 3)}}
    block_amax = x.abs().reshape(2, 2, 16).amax(-1) * 0.5  # half of each block saturates
    q = TensorQuantizer({**attrs, "pass_through_bwd": pass_through}, amax=block_amax)
    grad = _input_grad(q, x, upstream)
    if pass_through:
        assert torch.equal(grad, upstream)
    else:  # E2M1 saturates above 6 + 1 (half its end step) in units of the block's E4M3 scale
        assert (grad == 0).any() and (grad[grad != 0] == upstream[grad != 0]).all()


def test_fake_tensor_quant_takes_pass_through_bwd() -> None:
    x, upstream = _x_and_grad(seed=3)
    amax = torch.tensor(1.5)
    for pass_through, expected in (
        (True, upstream),
        (False, torch.where(_int8_kept(x, amax), upstream, 0.0)),
    ):
        xg = x.clone().requires_grad_()
        fake_tensor_quant(
            xg, amax, num_bits=8, narrow_range=False, pass_through_bwd=pass_through
        ).backward(upstream)
        assert torch.equal(xg.grad, expected)


@pytest.mark.parametrize("bad", [0.0, -1.0, 16.5])
def test_effective_bits_outside_0_to_16_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="effective_bits"):
        TensorQuantizer({"num_bits": 4, "effective_bits": bad})


def test_attributes_survive_save_and_restore(tmp_path) -> None:
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 4, "axis": 0, "effective_bits": 4.25},
            "*input_quantizer": {"num_bits": 8, "pass_through_bwd": False},
        },
        "algorithm": "max",
    }
    model = mtq.quantize(nn.Linear(8, 4), cfg, lambda m: m(torch.randn(2, 8)))
    mtq.save(model, tmp_path / "m.safetensors")
    fresh = mtq.restore(nn.Linear(8, 4), tmp_path / "m.safetensors")
    assert fresh.weight_quantizer.attribute_config.effective_bits == 4.25
    assert fresh.input_quantizer.attribute_config.pass_through_bwd is False
    assert fresh.weight_quantizer.attribute_config.pass_through_bwd is True

"""NVFP4 "four over six" (ModelOpt 0.47: ``block_sizes["four_over_six"]``, ``numeric_utils.py``
``E4M3_MAX_46 = 256``, the ``nvfp4_four_over_six`` preset's MSE search of multipliers 1.0 / 1.5):
checked against a float64 reference written from that definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
import quant_kernels as qk
from quant_core.nn import TensorQuantizer

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
ATTRS = {"num_bits": (2, 1), "block_sizes": {-1: 16, "scale_bits": (4, 3), "four_over_six": True}}


def _e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of float64 ``v`` (|v| <= 6 after clamping), ties to the even code."""
    a = v.abs().clamp(max=6.0).unsqueeze(-1)
    dist = (a - E2M1).abs()
    # ties: prefer the even code (index), by adding a tiny penalty to odd codes
    index = (dist + 1e-12 * (torch.arange(8) % 2)).argmin(-1)
    return torch.sign(v) * E2M1[index]


def _reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 four over six of ``w`` (rows of 16-blocks): ``(values, block picked M=4)``."""
    blocks = w.double().reshape(-1, 16)
    block_max = blocks.abs().amax(-1, keepdim=True)
    g = block_max.max() / (6 * 256)  # the global scale: largest block amax / (6 * 256)
    out, errors = [], []
    for multiplier in (1.0, 1.5):  # block max maps to 6, or to 4
        stored = (block_max * multiplier / 6 / g).float().to(torch.float8_e4m3fn).double()
        scale = stored * g
        safe = torch.where(scale == 0, 1.0, scale)
        y = torch.where(scale == 0, 0.0, _e2m1(blocks / safe) * safe)
        out.append(y)
        errors.append((blocks - y).square().sum(-1, keepdim=True))
    pick_four = errors[1] < errors[0]
    return torch.where(pick_four, out[1], out[0]).reshape(w.shape), pick_four.flatten()


def test_four_over_six_matches_the_float64_definition() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, :16] = 0.0  # an all-zero block
    q = TensorQuantizer(ATTRS)
    q.calibrate_from(w)
    expected, pick_four = _reference(w)
    assert 0.2 < pick_four.float().mean() < 0.9  # both choices occur
    y = q(w).double()
    assert torch.allclose(y, expected, rtol=2e-7, atol=0)
    assert torch.equal(y[3, :16], torch.zeros(16, dtype=torch.float64))


def test_four_over_six_codes_store_e4m3_scales_up_to_384_and_dequantize_exactly() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    amax = w.abs().reshape(8, 4, 16).amax(-1)
    kwargs = {"num_bits": (2, 1), "block_sizes": ATTRS["block_sizes"], "scale_bits": (4, 3)}
    qt = qk.quantize_to_codes(w, amax=amax, **kwargs)
    assert qt.global_scale == amax.max() / (6 * 256)
    assert qt.scale.float().max() <= 384  # 1.5 * 256: fits E4M3 without clamping
    assert torch.equal(qt.dequantize(), qk.fake_quantize(w, amax=amax, **kwargs))


def test_four_over_six_typed_entry_and_codes_match_the_float64_definition() -> None:
    """The typed kernel entry and the one quantizer-to-codes path keep four over six (the codes
    path used to drop the flag and code every block as 6)."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    fmt = qk.QuantFormat.parse(**ATTRS)
    amax = w.abs().reshape(16, 4, 16).amax(-1)
    expected, pick_four = _reference(w)
    assert bool(pick_four.any())
    y = qk.fake_quantize_format(w, fmt, amax=amax)
    assert torch.allclose(y.double(), expected, rtol=2e-7, atol=0)
    codes = qk.format_codes(w, fmt, amax)
    assert torch.allclose(codes.dequantize().double(), expected, rtol=2e-7, atol=0)


def test_four_over_six_config_calibrates_and_restores(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    mtq.quantize(model, mtq.NVFP4_FOUR_OVER_SIX_CFG, lambda m: m(x))
    wq = model[0].weight_quantizer
    assert wq.format.four_over_six and "4/6" in str(wq)
    assert torch.equal(wq.amax, model[0].weight.detach().abs().reshape(32, 4, 16).amax(-1))
    mtq.save(model, tmp_path / "m.safetensors")
    fresh = mtq.restore(nn.Sequential(nn.Linear(64, 32)), tmp_path / "m.safetensors")
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    ("block_sizes", "match"),
    [
        ({-1: 16, "type": "dynamic", "scale_bits": (4, 3), "four_over_six": True}, "static"),
        ({-1: 16, "four_over_six": True}, "NVFP4"),
        ({-1: 16, "scale_bits": (4, 3), "four_over_six": "yes"}, "True or False"),
    ],
)
def test_four_over_six_outside_static_nvfp4_is_refused(block_sizes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TensorQuantizer({"num_bits": (2, 1), "block_sizes": block_sizes})


@pytest.mark.parametrize("algorithm", ["gptq", {"method": "mse"}])
def test_four_over_six_calibrates_with_max_only(algorithm) -> None:
    model = nn.Sequential(nn.Linear(32, 8))
    cfg = {"quant_cfg": {"*weight_quantizer": ATTRS}, "algorithm": algorithm}
    with pytest.raises(ValueError, match=r"four over six.*'max' only"):
        mtq.quantize(model, cfg, lambda m: m(torch.randn(2, 32)))


def test_four_over_six_is_not_compressed() -> None:
    model = nn.Sequential(nn.Linear(32, 8))
    mtq.quantize(model, {"quant_cfg": {"*weight_quantizer": ATTRS}, "algorithm": "max"})
    with pytest.raises(ValueError, match="four over six"):
        mtq.compress(model)

"""A static NVFP4 quantizer's shared global amax (``TensorQuantizer.global_amax``).

Engines run layers that read the same input as one GEMM with one NVFP4 global scale, so export
gives such layers one global amax; for per-block calibrated (static) weights it is this override.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq

STATIC_NVFP4 = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {
            "quantizer_name": "*weight_quantizer",
            "cfg": {
                "num_bits": (2, 1),
                "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)},
                "enable": True,
            },
        },
    ],
    "algorithm": "max",
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    mtq.quantize(model, STATIC_NVFP4, lambda m: m(torch.randn(4, 64)))
    return model


def _nvfp4_float64(w: torch.Tensor, block_amax: torch.Tensor, global_amax: float) -> torch.Tensor:
    """NVFP4 by the spec in float64: E4M3 block scales under global_amax / (6 * 448), E2M1 codes."""
    w = w.double().reshape(w.shape[0], -1, 16)
    g = global_amax / (6 * 448)
    raw = (block_amax.double().reshape(w.shape[0], -1, 1) / 6) / g
    e4m3 = raw.clamp(max=448).float().to(torch.float8_e4m3fn).double()
    scale = e4m3 * g
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    v = (w / torch.where(scale == 0, 1, scale)).clamp(-6, 6)
    idx = (v.abs().unsqueeze(-1) - grid).abs().argmin(-1)  # nearest; ties checked below
    q = grid[idx] * v.sign()
    return (q * scale).reshape(w.shape[0], -1)


def test_global_amax_overrides_the_largest_block_amax_as_the_spec_says():
    layer = _model()[0]
    quantizer, weight = layer.weight_quantizer, layer.weight.detach()
    shared = quantizer.amax.max().item() * 1.7
    quantizer.global_amax = shared
    with torch.no_grad():
        got = quantizer(weight).double()
    want = _nvfp4_float64(weight, quantizer.amax, shared)
    # float32 scale arithmetic vs float64: a few ulps; a wrong code or block scale is >= 1/16 off
    off = (got - want).abs() > 1e-6 * want.abs().clamp(min=1e-30)
    assert off.float().mean() < 1e-3  # round-half-to-even ties may differ from argmin
    with torch.no_grad():
        quantizer.global_amax = None
        assert not torch.equal(quantizer(weight).double(), got)  # the override mattered


def test_global_amax_survives_save_restore_and_amax_changes_clear_it(tmp_path):
    model = _model()
    quantizer = model[0].weight_quantizer
    quantizer.global_amax = quantizer.amax.max() * 2
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    mtq.save(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    restored = mtq.restore(fresh, tmp_path / "m.safetensors")
    assert restored[0].weight_quantizer.global_amax.item() == quantizer.global_amax.item()
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    quantizer.amax = quantizer.amax * 0.5  # recalibrated: the old shared value no longer applies
    assert quantizer.global_amax is None


def test_global_amax_is_refused_below_the_block_amaxes_and_on_other_formats():
    model = _model()
    quantizer = model[0].weight_quantizer
    with pytest.raises(ValueError, match="below its largest block amax"):
        quantizer.global_amax = quantizer.amax.max() * 0.5
    int8 = mtq.TensorQuantizer({"num_bits": 8}, amax=1.0)
    with pytest.raises(ValueError, match="global_amax is for calibrated static NVFP4"):
        int8.global_amax = 2.0

"""Per-token dynamic activations (e.g. switched by max's per-token fallback) export when the
quantized input's last axis is only known at run time (a reshape with -1, as in attention)."""

from __future__ import annotations

import torch
from torch import nn

import quant_core as mtq
from quant_export import export_onnx, verify_onnx


class Heads(nn.Module):
    """Merges heads with a reshape whose last size ONNX shape inference cannot resolve."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(x.shape[0], x.shape[1], -1))


def test_per_token_input_with_symbolic_last_axis_exports_and_matches(tmp_path):
    torch.manual_seed(0)
    model = Heads()
    x = torch.randn(2, 10, 4, 8)
    x[0, 0] *= 100  # one outlier token in 20: max's fallback makes the input per-token dynamic
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    assert model.proj.input_quantizer.is_dynamic
    path = export_onnx(model, x, tmp_path / "heads.onnx")
    report = verify_onnx(path, model, torch.randn(3, 10, 4, 8), optimization="basic")
    assert report.rel_error < 1e-5

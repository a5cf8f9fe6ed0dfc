"""Models and helpers shared by the export tests (imported by name: every test folder has its own conftest)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import quant_core as mtq


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (16 and 32 input channels) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def small_mlp() -> nn.Module:
    """A 256 -> 256 -> 128 MLP with a GELU."""
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128))


def quantized(model: nn.Module, cfg: dict, sample: torch.Tensor) -> nn.Module:
    """A quantized, max-calibrated deep copy of ``model`` (calibrated on ``sample``)."""
    model = copy.deepcopy(model).eval()
    mtq.quantize(model, cfg, lambda m: m(sample))
    return model.eval()


def with_inputs(cfg: dict, inputs: dict) -> dict:
    """A copy of a built-in config with its ``*input_quantizer`` attributes replaced."""
    cfg = cfg.copy()
    cfg["quant_cfg"]["*input_quantizer"] = inputs
    return cfg

"""Shared models and helpers for the export tests: a small CNN and MLP, quantized with quant-core."""

from __future__ import annotations

import pytest
import torch
from export_models import SmallCNN, small_mlp
from torch import nn


@pytest.fixture
def mlp_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return small_mlp().eval(), torch.randn(8, 256)


@pytest.fixture
def cnn_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.randn(2, 16, 8, 8)

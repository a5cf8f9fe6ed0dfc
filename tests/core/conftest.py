"""Shared small models and calibration data for the quant-core tests."""

from __future__ import annotations

import pytest
import torch
from core_models import SmallCNN, TinyTransformer, seeded


@pytest.fixture
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def images() -> list[torch.Tensor]:
    gen = seeded(1)
    return [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(3)]


@pytest.fixture
def transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()


@pytest.fixture
def tokens() -> list[torch.Tensor]:
    gen = seeded(2)
    return [torch.randn(2, 8, 32, generator=gen) for _ in range(3)]

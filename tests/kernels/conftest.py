"""Shared fixtures for the kernels tests: run Triton through its interpreter on CPU, skip gpu tests without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton compiles anything; CI sets it too (noxfile).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu are skipped when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and "tests/kernels" in str(item.fspath):
            item.add_marker(skip)

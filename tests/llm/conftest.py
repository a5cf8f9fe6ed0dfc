"""Shared fixtures for the quant-llm tests: tiny-model calibration batches and a one-thread torch."""

from __future__ import annotations

import pytest
import torch

from quant_llm.testing.tiny_models import random_token_batches


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; several workers on 2 shared cores otherwise oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calib_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of 2x16 random tokens."""
    return random_token_batches(batches=2, batch_size=2, seq_len=16, seed=0)


@pytest.fixture
def forward_loop(calib_batches):
    """A forward_loop over :func:`calib_batches`."""

    def loop(model: torch.nn.Module) -> None:
        for batch in calib_batches:
            model(**batch)

    return loop

"""A forward_loop guard for layer-by-layer calibration: every call must feed the same batches in order.

Layer-by-layer calibration (the ``layerwise`` algorithm option) calls ``forward_loop`` once per
decoder layer and pairs the hidden states recorded on one call with the masks and positions the
model builds from the batch of the next call. A loader that shuffles (``DataLoader(shuffle=True)``)
or draws new samples on each call would pair each layer's inputs with another batch, silently.
:class:`BatchOrderGuard` fingerprints the inputs of each model call and refuses a call that
differs from the first, naming the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["BatchOrderGuard", "fingerprint"]


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            digest.update(repr((tuple(value.shape), value.dtype)).encode())
            return
        data = value.detach().contiguous().cpu()
        digest.update(repr((tuple(data.shape), data.dtype)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    elif isinstance(value, (tuple, list)):
        for item in value:
            _update(digest, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (int, float, bool, str)) or value is None:
        digest.update(repr(value).encode())


def fingerprint(args: tuple, kwargs: dict[str, Any]) -> str:
    """A hash of the tensors (and plain values) of one model call's inputs."""
    digest = hashlib.sha1(usedforsecurity=False)
    _update(digest, args)
    _update(digest, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
    return digest.hexdigest()


class BatchOrderGuard:
    """Wraps ``forward_loop``: the first call records each model call's input fingerprint, every
    later call must give the same fingerprints in the same order (ValueError naming the batch)."""

    def __init__(self, forward_loop: Callable[[nn.Module], Any]) -> None:
        self.forward_loop = forward_loop
        self.first: list[str] | None = None
        self.calls = 0

    def __call__(self, model: nn.Module) -> Any:
        seen: list[str] = []

        def record(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen.append(fingerprint(args, kwargs))

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            result = self.forward_loop(model)
        finally:
            handle.remove()
        self.calls += 1
        if self.first is None:
            self.first = seen
            return result
        for index, (before, now) in enumerate(zip(self.first, seen)):
            if before != now:
                raise ValueError(
                    f"layerwise calibration: forward_loop gave the model a different batch {index} "
                    f"(counting from 0) on its call {self.calls} than on its first call, so each "
                    "layer's inputs would be paired with another batch's mask and positions; it "
                    "must run the same batches in the same order every time (a list of batches, "
                    "or DataLoader(..., shuffle=False) with a fixed dataset)"
                )
        return result

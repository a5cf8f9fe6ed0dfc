"""ModelOpt's ``quantization.utils.calib_utils``: the running input Hessian GPTQ collects."""

from __future__ import annotations

import torch

__all__ = ["update_hessian"]


@torch.no_grad()
def update_hessian(
    input: torch.Tensor, hessian: torch.Tensor, n_samples: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch into the running Hessian ``H = (2 / n) * sum_t x_t x_t^T`` (in place).

    ``input`` is ``(..., features)``; every row of its last dimension is one sample (token).
    ``hessian`` (``features x features``) holds the mean over the ``n_samples`` seen so far; it
    is rescaled to the new count and the batch added, in float32. Returns ``(hessian, n)`` with
    the new count; an input with no rows (an expert that received no token) changes nothing.
    """
    x = input.reshape(-1, input.shape[-1]).float()
    batch = x.shape[0]
    if batch == 0:
        return hessian, n_samples
    total = n_samples + batch
    hessian.mul_(n_samples / total)
    hessian.add_(((2.0 / total) * (x.t() @ x)).to(hessian.device, hessian.dtype))
    return hessian, total

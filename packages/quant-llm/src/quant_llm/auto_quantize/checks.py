"""Checks of ``auto_quantize``'s arguments, run before any candidate is calibrated.

Each refusal is one line naming the argument and the fix: a constraint that is not a positive
number (``effective_bits="six"``), step counts below one, a ``forward_step`` whose output the
scoring method cannot use (a scalar loss for ``method="kl"``), a ``loss_func`` returning a
non-scalar, NaN or infinite loss, and a one-shot iterator drained by calibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import nn

__all__ = ["check_arguments", "check_batches", "check_loss", "probe_step"]


def check_arguments(
    constraints: Any, num_calib_steps: Any, num_score_steps: Any, num_gradient_steps: Any = None
) -> None:
    """Refuse constraints that are not ``{"effective_bits": b}`` / ``{"weight_bytes": n}`` with a
    positive finite number, and step counts that are not positive integers (``num_gradient_steps``
    may be None: its default)."""
    if not isinstance(constraints, dict) or len(constraints) != 1:
        raise ValueError(
            "auto_quantize: constraints must be exactly one of {'effective_bits': b} or "
            f"{{'weight_bytes': n}}, got {constraints!r}"
        )
    ((key, value),) = constraints.items()
    if key not in ("effective_bits", "weight_bytes"):
        raise ValueError(
            f"auto_quantize: unknown constraint {key!r}; use 'effective_bits' or 'weight_bytes'"
        )
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"auto_quantize: constraints[{key!r}] must be a positive number (e.g. "
            f"{{'{key}': {4.8 if key == 'effective_bits' else 1e9}}}), got {value!r}"
        )
    counts = {"num_calib_steps": num_calib_steps, "num_score_steps": num_score_steps}
    if num_gradient_steps is not None:
        counts["num_gradient_steps"] = num_gradient_steps
    for name, steps in counts.items():
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"auto_quantize: {name} must be a positive number of batches, got {steps!r}"
            )


def check_batches(
    calib: list[Any], score: list[Any], data_loader: Any, num_calib_steps: int
) -> None:
    """Refuse a data_loader that gave no calibration batch, or no score batch after calibration."""
    if not calib:
        raise ValueError(
            "auto_quantize: data_loader gave no batch; it needs calibration and score batches"
        )
    if not score:
        one_shot = iter(data_loader) is data_loader
        hint = (
            f"data_loader is a one-shot iterator (a generator) and calibration took all "
            f"{len(calib)} of its batches (num_calib_steps={num_calib_steps}); pass a list or a "
            "DataLoader, or a num_calib_steps below the number of batches"
            if one_shot
            else "data_loader gave calibration batches but none for scoring"
        )
        raise ValueError(f"auto_quantize: no batch left to score: {hint}")


def check_loss(loss: Any, batch_index: int) -> torch.Tensor:
    """``loss`` if it is a finite scalar tensor; else a one-line error naming loss_func."""
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"auto_quantize: loss_func returned {type(loss).__name__} for score batch "
            f"{batch_index}; it must return a scalar torch.Tensor (e.g. F.cross_entropy(...))"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"auto_quantize: loss_func returned a tensor of shape {tuple(loss.shape)} for score "
            f"batch {batch_index}; it must return a scalar loss (reduce it with .mean() or .sum())"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(
            f"auto_quantize: loss_func returned {float(loss.detach())} for score batch "
            f"{batch_index}; the gradient scores need a finite loss (check the batch and the "
            "model in full precision)"
        )
    return loss


def probe_step(
    model: nn.Module,
    batch: Any,
    forward_step: Callable[[nn.Module, Any], Any],
    loss_func: Callable[[Any, Any], torch.Tensor] | None,
    method: str,
) -> None:
    """Run ``forward_step`` on one batch of the float model and refuse an output ``method`` cannot score."""
    with torch.no_grad():
        output = forward_step(model, batch)
        if method in ("kl", "kl_div"):
            logits = getattr(output, "logits", output)
            if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
                got = (
                    f"a tensor of shape {tuple(logits.shape)} (a loss?)"
                    if isinstance(logits, torch.Tensor)
                    else type(output).__name__
                )
                raise ValueError(
                    f"auto_quantize: method='kl' needs forward_step to return the logits (or an "
                    f"object with .logits), got {got}; return model(**batch).logits, or use "
                    "method='gradient' with a loss_func"
                )
        elif loss_func is not None:
            check_loss(loss_func(output, batch), 0)

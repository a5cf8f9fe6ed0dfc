"""Scoring: how much each candidate format of each layer hurts the model.

``gradient``: sum over score batches of ``(dL/dY * (Y_quant - Y))**2`` per layer (a Fisher estimate
of the loss increase), with ``Y_quant`` the candidate's calibrated layer on the full-precision input.
``kl``: KL divergence of the full-precision logits to the logits with only that layer quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quant_llm.auto_quantize.checks import check_loss

SCORE_METHODS = (
    "gradient",
    "gradient_approx",
    "kl",
    "kl_div",
)  # "kl_div": ModelOpt 0.47 name for "kl"


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"method='kl' needs forward_step to return logits or an object with .logits, got {type(output).__name__}"
        )
    return logits


def gradient_scores(
    model: nn.Module,
    layers: dict[str, list[nn.Module | None]],
    batches: Sequence[Any],
    forward_step: Callable[[nn.Module, Any], Any],
    loss_func: Callable[[Any, Any], torch.Tensor],
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Per layer, the Fisher score of each candidate (0 for the unquantized one)."""
    scores = {name: [0.0] * len(per) for name, per in layers.items()}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def forward_hook(
            _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"auto_quantize: layer {name} returned {type(out).__name__}, not a tensor"
                )
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            y = out.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    for i, cand in enumerate(layers[name]):
                        if cand is not None:
                            scores[name][i] += float(
                                ((grad * (cand(*args, **kwargs) - y)) ** 2).sum(dtype=torch.float64)
                            )

            if out.requires_grad:
                out.register_hook(grad_hook)

        return forward_hook

    for name in layers:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(inputs_need_grad, with_kwargs=True))
        handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
    try:
        with frozen_weights(model):
            for index, batch in enumerate(
                tqdm(batches, desc="auto_quantize: gradient scores", disable=not verbose)
            ):
                check_loss(loss_func(forward_step(model, batch), batch), index).backward()
    finally:
        for h in handles:
            h.remove()
    return scores


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Within the block no parameter needs grad (only dL/dY is wanted: no weight gradient)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def inputs_need_grad(
    _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """With frozen weights, make a searched layer's float inputs leaves that need grad, so dL/dY flows."""
    if not torch.is_grad_enabled() or any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    ):
        return None
    return tuple(
        a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ), kwargs


def kl_scores(
    model: nn.Module,
    layers: dict[str, list[nn.Module | None]],
    batches: Sequence[Any],
    forward_step: Callable[[nn.Module, Any], Any],
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Per layer, the summed KL(full precision || only this layer quantized) of the logits per candidate."""
    scores = {name: [0.0] * len(per) for name, per in layers.items()}
    work = [(n, i, c) for n, per in layers.items() for i, c in enumerate(per) if c is not None]
    with (
        torch.no_grad(),
        tqdm(
            total=len(batches) * len(work), desc="auto_quantize: KL scores", disable=not verbose
        ) as bar,
    ):
        for batch in batches:
            ref = F.log_softmax(_logits(forward_step(model, batch)).double(), dim=-1)
            for name, i, cand in work:
                handle = model.get_submodule(name).register_forward_hook(
                    lambda _m, a, kw, _o, c=cand: c(*a, **kw), with_kwargs=True
                )
                try:
                    out = F.log_softmax(_logits(forward_step(model, batch)).double(), dim=-1)
                finally:
                    handle.remove()
                scores[name][i] += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
                bar.update()
    return scores

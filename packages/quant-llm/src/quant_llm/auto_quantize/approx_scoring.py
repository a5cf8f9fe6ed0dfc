"""The approximate gradient score (``method="gradient_approx"``): few backward passes, no candidate forwards.

The exact score of a candidate is ``sum_t sum_j (g_tj * dY_tj)**2`` over the score tokens ``t`` and
output channels ``j`` (``g = dL/dY``, ``dY`` the candidate's output error). Here the squared
gradient is taken as independent of the output error within a channel, so the score becomes
``sum_j mean_t(g_tj**2) * sum_t dY_tj**2``, corrected by the ratio of the exact score to that
estimate on the batches that run backward (where both are known): tokens with no gradient
(padding, positions a loss ignores) and channels whose gradient follows the token (the logits of
``lm_head``) break the independence, and the ratio measures by how much.

- ``mean_t(g_tj**2)`` and the ratio come from the first ``num_gradient_steps`` score batches, the
  only ones that run a backward pass (and every candidate, on their layer inputs);
- ``sum_t dY_tj**2`` covers every score batch. For a candidate that is exactly a linear map on the
  layer's input (weight-only quantization: ``cand(x) == x @ W_q.T + b``, checked on the first
  batch's input) it is ``diag(dW @ H @ dW.T)`` with ``dW = W_q - W`` and ``H = sum_t x_t x_t.T``,
  one Gram matrix per distinct input (q/k/v and gate/up share one), so the candidate is never run,
  unless running it costs fewer multiply-adds (a wide input with few outputs, like ``down_proj``);
  any other candidate (quantized activations, fused experts) is run on each batch's input.
- Forward-only batches stop after the last searched layer (the LM head and loss are not computed).

Memory: one float32 ``k x k`` Gram matrix per distinct layer input of width ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quant_llm.auto_quantize.checks import check_loss
from quant_llm.auto_quantize.scoring import frozen_weights, inputs_need_grad

_PROBE_ROWS = 16


class _StopForward(Exception):
    """Raised after the last searched layer of a forward-only batch: the rest is not needed."""


def _channels(t: torch.Tensor) -> torch.Tensor:
    """Per output channel sum of squares (accumulated in float64) over every other dimension."""
    return t.detach().reshape(-1, t.shape[-1]).pow(2).sum(0, dtype=torch.float64)


def _is_weight_only_linear(fp: nn.Module, cand: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``cand`` is exactly ``F.linear`` with its own weight and ``fp``'s bias on ``x``."""
    if not isinstance(fp, nn.Linear) or not isinstance(getattr(cand, "weight", None), torch.Tensor):
        return False
    if cand.weight.shape != fp.weight.shape:
        return False
    bias, fp_bias = getattr(cand, "bias", None), fp.bias
    if (bias is None) != (fp_bias is None) or (bias is not None and not torch.equal(bias, fp_bias)):
        return False
    rows = x.detach().reshape(-1, x.shape[-1])[:_PROBE_ROWS]
    with torch.no_grad():
        return torch.equal(cand(rows), F.linear(rows, cand.weight, bias))


def _gram_is_cheaper(width: int, outputs: int, candidates: int, tokens: int) -> bool:
    """Whether a Gram matrix (``width**2`` per token, then ``candidates * outputs * width**2``)
    costs fewer multiply-adds than running the candidates (``candidates * outputs * width`` per
    token); layers that later share the input only make the Gram matrix cheaper."""
    per_candidate = candidates * outputs
    return width * (tokens + per_candidate) < per_candidate * tokens


class _LayerStats:
    """What the approximate score needs of one searched layer, gathered over the score batches."""

    def __init__(self, fp: nn.Module, candidates: list[nn.Module | None]) -> None:
        self.fp = fp
        self.candidates = candidates
        self.grad_sq: torch.Tensor | None = None  # per output channel, summed over gradient tokens
        self.grad_tokens = 0
        self.out_err = [None] * len(candidates)  # per channel sum of dY**2 (run candidates)
        self.err_grad_batches = [None] * len(candidates)  # the same over the gradient batches
        self.exact_grad_batches = [0.0] * len(candidates)  # exact score on the gradient batches
        self.gram_path: set[int] | None = None  # candidates scored through the Gram matrix
        self.owner: str | None = None  # layer whose Gram matrix this layer's input shares


def approx_gradient_scores(
    model: nn.Module,
    layers: dict[str, list[nn.Module | None]],
    batches: Sequence[Any],
    forward_step: Callable[[nn.Module, Any], Any],
    loss_func: Callable[[Any, Any], torch.Tensor],
    num_gradient_steps: int,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Per layer, the approximate Fisher score of each candidate (0 for the unquantized one)."""
    stats = {name: _LayerStats(model.get_submodule(name), per) for name, per in layers.items()}
    grams: dict[str, torch.Tensor] = {}
    last_input: list[Any] = [None, None]  # (tensor, owner) of the latest searched layer's input
    calls_per_forward: list[int] = [0, 0]  # (calls counted on the first batch, calls this batch)
    phase = {"gradient": True, "first": True}

    def pre_hook(name: str) -> Callable[..., None]:
        layer = stats[name]

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if len(args) == 1 and not kwargs else None
            if phase["first"]:
                layer.gram_path = (
                    set()
                    if not isinstance(x, torch.Tensor)
                    else {
                        i
                        for i, c in enumerate(layer.candidates)
                        if c is not None and _is_weight_only_linear(layer.fp, c, x)
                    }
                )
                shared = last_input[0] is x and x is not None
                layer.owner = last_input[1] if shared else name
                if not shared and layer.gram_path:
                    tokens = x.numel() // x.shape[-1] * len(batches)
                    if not _gram_is_cheaper(
                        x.shape[-1], layer.fp.out_features, len(layer.gram_path), tokens
                    ):
                        layer.gram_path = set()
            if not layer.gram_path:
                return
            if layer.owner == name:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                if name in grams:
                    grams[name].addmm_(flat.T, flat)
                else:
                    grams[name] = flat.T @ flat
                last_input[0], last_input[1] = x, name
            elif last_input[0] is not x:
                raise RuntimeError(
                    f"auto_quantize(method='gradient_approx'): layer {name} shared the input of "
                    f"{layer.owner} on the first score batch but not on a later one; use "
                    "method='gradient'"
                )

        return hook

    def forward_hook(name: str) -> Callable[..., None]:
        layer = stats[name]

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"auto_quantize: layer {name} returned {type(out).__name__}, not a tensor"
                )
            if phase["gradient"] and out.requires_grad:
                inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                y = out.detach()
                out.register_hook(lambda grad: _add_grad(layer, grad, inputs, kwargs, y))
            else:
                with torch.no_grad():
                    for i, cand in enumerate(layer.candidates):
                        if cand is not None and i not in layer.gram_path:
                            _accumulate(layer.out_err, i, _channels(cand(*args, **kwargs) - out))
            if phase["first"]:
                calls_per_forward[0] += 1
            else:
                calls_per_forward[1] += 1
                if not phase["gradient"] and calls_per_forward[1] == calls_per_forward[0]:
                    raise _StopForward

        return hook

    handles = []
    for name in layers:
        module = stats[name].fp
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_pre_hook(inputs_need_grad, with_kwargs=True))
        handles.append(module.register_forward_hook(forward_hook(name), with_kwargs=True))
    try:
        with frozen_weights(model):
            for index, batch in enumerate(
                tqdm(batches, desc="auto_quantize: approximate scores", disable=not verbose)
            ):
                phase["gradient"] = index < num_gradient_steps
                phase["first"] = index == 0
                calls_per_forward[1] = 0
                last_input[0] = last_input[1] = None
                if phase["gradient"]:
                    check_loss(loss_func(forward_step(model, batch), batch), index).backward()
                    continue
                try:
                    with torch.no_grad():
                        forward_step(model, batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {name: _scores(layer, grams) for name, layer in stats.items()}


def _accumulate(sums: list[torch.Tensor | None], i: int, value: torch.Tensor) -> None:
    sums[i] = value if sums[i] is None else sums[i] + value


def _add_grad(
    layer: _LayerStats,
    grad: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    y: torch.Tensor,
) -> None:
    """On a gradient batch: the squared gradient per channel, and each candidate's exact score."""
    sq = _channels(grad)
    layer.grad_sq = sq if layer.grad_sq is None else layer.grad_sq + sq
    layer.grad_tokens += grad.numel() // grad.shape[-1]
    with torch.no_grad():
        for i, cand in enumerate(layer.candidates):
            if cand is None:
                continue
            delta = cand(*args, **kwargs) - y
            layer.exact_grad_batches[i] += float((grad * delta).pow(2).sum(dtype=torch.float64))
            err = _channels(delta)
            _accumulate(layer.err_grad_batches, i, err)
            if i not in layer.gram_path:
                _accumulate(layer.out_err, i, err)


def _scores(layer: _LayerStats, grams: dict[str, torch.Tensor]) -> list[float]:
    """``sum_j mean_t(g_tj**2) * sum_t dY_tj**2`` per candidate of one layer, times the exact score
    over that estimate on the gradient batches."""
    if layer.grad_sq is None:
        return [0.0] * len(layer.candidates)  # no gradient reached the layer: it does not matter
    mean_grad_sq = layer.grad_sq / layer.grad_tokens
    out = []
    for i, cand in enumerate(layer.candidates):
        if cand is None:
            out.append(0.0)
            continue
        if i in layer.gram_path:
            with torch.no_grad():
                delta = (cand.weight - layer.fp.weight).float()
                err = ((delta @ grams[layer.owner]) * delta).sum(1, dtype=torch.float64)
        else:
            err = layer.out_err[i]
        estimate = float((mean_grad_sq * err).sum())
        on_gradient_batches = float((mean_grad_sq * layer.err_grad_batches[i]).sum())
        if on_gradient_batches > 0:
            estimate *= layer.exact_grad_batches[i] / on_gradient_batches
        out.append(estimate)
    return out

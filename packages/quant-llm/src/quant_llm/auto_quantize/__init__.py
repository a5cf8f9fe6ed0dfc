"""AutoQuantize: search the per-layer mix of formats with the least loss under a size budget.

``model, search_state = auto_quantize(model, constraints={"effective_bits": 4.8}, quantization_formats=[...],
data_loader=..., forward_step=..., loss_func=...)``; also reachable as ``mtq.auto_quantize``. Modules:
``candidates`` (resolve + calibrate), ``scoring``, ``grouping``, ``solver`` (milp), ``state``
(search state, replay config), ``report`` (summary, plot).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

import quant_core as mtq
from quant_llm.auto_quantize.approx_scoring import approx_gradient_scores
from quant_llm.auto_quantize.candidates import (
    UNQUANTIZED_BITS,
    calibrate_candidates,
    loop_for,
    resolve_formats,
    searchable_layers,
    weight_bits,
    weight_params,
)
from quant_llm.auto_quantize.checks import check_arguments, check_batches, probe_step
from quant_llm.auto_quantize.grouping import group_layers
from quant_llm.auto_quantize.report import plot_sensitivity, summary_table
from quant_llm.auto_quantize.scoring import SCORE_METHODS, gradient_scores, kl_scores
from quant_llm.auto_quantize.solver import solve
from quant_llm.auto_quantize.state import (
    get_auto_quantize_config,
    load_scores,
    quantizer_settings,
    replay_config,
    save_scores,
)

__all__ = ["auto_quantize", "get_auto_quantize_config", "plot_sensitivity", "summary_table"]


def _budget(constraints: dict[str, float], params: int, excluded: int) -> float:
    """The budget in weight bits over the searched layers, less ``excluded`` weights kept at 16 bits."""
    if "effective_bits" in constraints:
        total = float(constraints["effective_bits"]) * (params + excluded)
    else:
        total = float(constraints["weight_bytes"]) * 8
    budget = total - UNQUANTIZED_BITS * excluded
    if budget <= 0:
        raise ValueError(
            f"auto_quantize: constraints={constraints} with count_excluded=True leave no bits for "
            f"the searched layers: the {excluded} weights outside the search cost "
            f"{UNQUANTIZED_BITS * excluded / 8:.0f} bytes at 16 bits"
        )
    return budget


def excluded_linears(model: nn.Module, searched: Iterable[str]) -> dict[str, int]:
    """Every ``nn.Linear`` of ``model`` outside the searched units -> its weight count (``lm_head``, ...)."""
    prefixes = tuple(f"{n}." for n in searched)
    searched = set(searched)
    return {
        name: weight_params(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in searched and not name.startswith(prefixes)
    }


def auto_quantize(
    model: nn.Module,
    constraints: dict[str, float],
    quantization_formats: Iterable[str | dict[str, Any] | None],
    data_loader: Iterable[Any],
    forward_step: Callable[[nn.Module, Any], Any],
    loss_func: Callable[[Any, Any], torch.Tensor] | None = None,
    num_calib_steps: int = 512,
    num_score_steps: int = 128,
    method: str = "gradient",
    verbose: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    count_excluded: bool = False,
    num_gradient_steps: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize ``model`` in place with the searched mix; returns ``(model, search_state)``.

    ``constraints``: ``{"effective_bits": b}`` (mean bits per weight of the searched layers, 16 for
    unquantized ones) or ``{"weight_bytes": n}``. Layers a candidate config leaves off (its
    ``*lm_head*`` exclusion, ...) are not searched; list them in a config dict to search them.
    ``count_excluded=True`` counts the budget over the whole model: every ``nn.Linear`` outside
    the search (``lm_head``, ...) at 16 bits, as ModelOpt, which searches ``lm_head``, counts it;
    ``search_state["whole_model"]`` gives that figure either way.
    ``method``: ``"gradient"`` (needs ``loss_func``; ModelOpt's score: per score batch a forward, a
    backward and each candidate of each layer run on its input), ``"gradient_approx"`` (the same
    Fisher score with the squared gradient averaged per output channel over the first
    ``num_gradient_steps`` batches (default a quarter of ``num_score_steps``, at least one) and
    weight-only candidates scored from each layer input's Gram matrix, scaled by the exact score
    over that estimate on the gradient batches: one backward in four, candidate forwards only there;
    see :mod:`quant_llm.auto_quantize.approx_scoring`) or ``"kl"`` /
    ``"kl_div"`` (ModelOpt's name; logits KL). ``search_state["best"]`` is ModelOpt's summary of the pick: ``recipe``
    (layer -> candidate name), ``constraints`` (``effective_bits`` achieved), ``score`` (the
    chosen candidates' summed scores) and ``is_satisfied``.
    ``checkpoint`` (ModelOpt's option): a JSON file of the search's scores. When it exists and was
    written for the same candidates, layer groups and method, its scores are used and scoring is
    skipped (so another budget is a quick re-solve); otherwise the scores are computed and written
    there.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"method={method!r}; choose one of {SCORE_METHODS}")
    if method.startswith("gradient") and loss_func is None:
        raise ValueError(f"method={method!r} needs loss_func(output, batch) -> scalar loss")
    check_arguments(constraints, num_calib_steps, num_score_steps, num_gradient_steps)
    if num_gradient_steps is None:
        num_gradient_steps = max(1, num_score_steps // 4)
    candidates = resolve_formats(quantization_formats)
    calib = list(itertools.islice(data_loader, num_calib_steps))
    score = list(itertools.islice(data_loader, num_score_steps))
    check_batches(calib, score, data_loader, num_calib_steps)
    if method.startswith("kl") or any(cfg and mtq.need_calibration(cfg) for _n, cfg in candidates):
        # refuse a bad forward_step/loss_func before calibrating on data; without calibration the
        # first score batch checks the loss as early, and a probe forward would cost one batch
        probe_step(model, score[0], forward_step, loss_func, method)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in calib:
                forward_step(m, batch)

    copies = calibrate_candidates(model, candidates, forward_loop)
    layers = searchable_layers(copies)
    groups = group_layers(list(layers))
    bits = {n: [16.0 if c is None else weight_bits(c) for c in per] for n, per in layers.items()}
    settings = {n: [quantizer_settings(c) for c in per] for n, per in layers.items()}
    for quantized in copies:
        if quantized is not None:  # scoring calls each layer many times: quantize weights once
            mtq.fold_weight(quantized)
    del copies  # scoring needs only the searched layers of each copy, not its embeddings or head
    keys = list(groups)
    names = [name for name, _ in candidates]
    saved = load_scores(checkpoint, names, groups, method) if checkpoint is not None else None
    if saved is not None:
        scores = np.array([saved[k] for k in keys])
    else:
        if method == "gradient":
            per_layer = gradient_scores(model, layers, score, forward_step, loss_func, verbose)
        elif method == "gradient_approx":
            per_layer = approx_gradient_scores(
                model, layers, score, forward_step, loss_func, num_gradient_steps, verbose
            )
        else:
            per_layer = kl_scores(model, layers, score, forward_step, verbose)
        scores = np.array(
            [
                [sum(per_layer[n][i] for n in groups[k]) for i in range(len(candidates))]
                for k in keys
            ]
        )
        if checkpoint is not None:
            save_scores(checkpoint, names, groups, method, dict(zip(keys, scores.tolist())))
    params = {n: weight_params(model.get_submodule(n)) for n in layers}
    costs = np.array(
        [
            [sum(params[n] * bits[n][i] for n in groups[k]) for i in range(len(candidates))]
            for k in keys
        ]
    )
    total = sum(params.values())
    excluded = excluded_linears(model, layers)
    excluded_params = sum(excluded.values())
    counted = total + excluded_params if count_excluded else total
    budget = _budget(constraints, total, excluded_params if count_excluded else 0)
    try:
        picks = solve(scores, costs, budget)
    except ValueError as err:
        floor = costs.min(axis=1).sum() + (
            UNQUANTIZED_BITS * excluded_params if count_excluded else 0
        )
        raise ValueError(
            f"auto_quantize: {err} (in weight bits; cheapest effective bits {floor / counted:.4f})"
        ) from None
    choice = {n: picks[gi] for gi, k in enumerate(keys) for n in groups[k]}
    config = replay_config(
        {n: settings[n][i] for n, i in choice.items()},
        [candidates[i][1]["algorithm"] for i in sorted(set(picks)) if candidates[i][1] is not None],
    )
    used = float(sum(costs[gi, i] for gi, i in enumerate(picks)))
    whole = UNQUANTIZED_BITS * excluded_params
    state = {
        "candidates": [name for name, _ in candidates],
        "candidate_bits": bits,
        "layers": {
            n: {"params": params[n], "group": next(k for k in keys if n in groups[k])}
            for n in layers
        },
        "groups": groups,
        "scores": {k: scores[gi].tolist() for gi, k in enumerate(keys)},
        "method": method,
        "constraints": dict(constraints),
        "choice": {n: candidates[i][0] for n, i in choice.items()},
        "effective_bits": used / total,
        "weight_bytes": used / 8,
        "count_excluded": count_excluded,
        "whole_model": {
            "effective_bits": (used + whole) / (total + excluded_params),
            "weight_bytes": (used + whole) / 8,
            "excluded": excluded,
        },
        "config": config,
        "best": {
            "recipe": {n: candidates[i][0] for n, i in choice.items()},
            "constraints": {"effective_bits": (used + (whole if count_excluded else 0)) / counted},
            "score": float(sum(scores[gi, i] for gi, i in enumerate(picks))),
            "is_satisfied": bool(used <= budget * (1 + 1e-9)),
        },
    }
    del layers
    mtq.quantize(model, config, loop_for(config, forward_loop))
    if verbose:
        print(summary_table(state))
    return model, state

"""Solver: the exact choice of one candidate per group under a size budget, with scipy's ``milp``."""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def solve(scores: np.ndarray, costs: np.ndarray, budget: float) -> list[int]:
    """Candidate index per group minimising the summed score with ``sum(costs[chosen]) <= budget``.

    ``scores`` and ``costs`` are (groups, candidates); raises ValueError when no choice fits.
    """
    n_groups, n_cand = scores.shape
    cheapest = float(costs.min(axis=1).sum())
    if cheapest > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} is below the cheapest choice {cheapest:.6g}")
    one_each = np.kron(np.eye(n_groups), np.ones(n_cand))
    scale = float(np.abs(scores).max()) or 1.0
    res = milp(
        c=(scores / scale).ravel(),
        integrality=np.ones(scores.size),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(costs.ravel()[None, :], -np.inf, budget),
        ],
    )
    if res.x is None:
        raise ValueError(f"no choice of formats meets the budget {budget:.6g}: {res.message}")
    return [int(i) for i in np.round(res.x).reshape(n_groups, n_cand).argmax(axis=1)]

"""Report: a summary table of the choice and ``plot_sensitivity`` (a PNG of scores and choices)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quant_core.atomic import atomic_temp


def summary_table(search_state: dict[str, Any]) -> str:
    """One line per group: layers, chosen format and the score of each candidate."""
    cands = search_state["candidates"]
    head = f"{'group':48} {'params':>10} {'choice':>22} " + " ".join(f"{c[:16]:>16}" for c in cands)
    lines = [head, "-" * len(head)]
    for key, names in search_state["groups"].items():
        params = sum(search_state["layers"][n]["params"] for n in names)
        choice = search_state["choice"][names[0]]
        scores = " ".join(f"{s:16.4g}" for s in search_state["scores"][key])
        lines.append(f"{key[-48:]:48} {params:>10} {choice[:22]:>22} {scores}")
    lines.append(
        f"effective bits {search_state['effective_bits']:.4f}, weight bytes {search_state['weight_bytes']:.0f}"
    )
    return "\n".join(lines)


def plot_sensitivity(search_state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG of each group's score per candidate (log scale), the chosen one marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot_sensitivity needs matplotlib: pip install 'quant-llm[plot]'"
        ) from None
    keys = list(search_state["groups"])
    cands = search_state["candidates"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(keys)), 4.0))
    for i, cand in enumerate(cands):
        ys = [max(search_state["scores"][k][i], 1e-12) for k in keys]
        ax.plot(range(len(keys)), ys, marker="o", label=cand)
    for x, k in enumerate(keys):
        i = cands.index(search_state["choice"][search_state["groups"][k][0]])
        ax.plot([x], [max(search_state["scores"][k][i], 1e-12)], "k*", markersize=12)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)), [k[-30:] for k in keys], rotation=90, fontsize=6)
    ax.set_ylabel(f"{search_state['method']} score")
    ax.set_title(f"auto_quantize: {search_state['effective_bits']:.3f} effective bits (* = chosen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = atomic_temp(path)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)

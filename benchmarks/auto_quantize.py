"""AutoQuantize on real SmolLM2-135M or MiniLM: the searched mix vs uniform formats and random mixes.

Scores on *Emma*, evaluates on held-apart *Pride and Prejudice*: SmolLM2's perplexity
(next-token loss), or MiniLM's mean embedding cosine to fp32 (loss 1 - cosine). Candidates are weight-only
INT4 block-128 (4.125 bits), INT8 per-channel (8 bits) and unquantized (16 bits); for each budget the
table lists the searched mix, each uniform format that fits, and the mean of 5 random mixes that
fill the same budget (a milp with random scores). When ``modelopt`` is importable (``nox -s
modelopt -- auto_quantize.py``) it also runs ModelOpt's ``auto_quantize`` on the same model, candidates, budget and
batches; its bits are recounted with quant's table (ModelOpt counts INT4 block-128 as 4.0 bits, not
4.125). Each search reports wall seconds, this process's CPU seconds (steadier than wall time on a
busy machine; run with ``OMP_NUM_THREADS=1`` to compare single-thread work) and its peak resident
memory above the start.

    python benchmarks/auto_quantize.py [--model smollm2|minilm] [--budgets 5,6,8] [--windows 4]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _minilm import austen_sentences, embed, embedding_metrics, load_minilm, mean_pool
from _minilm import batches as minilm_batches
from accuracy import PeakMemory, high_water_bytes

import quant_core as mtq
from quant_llm import get_calib_dataloader, perplexity
from quant_llm.auto_quantize.solver import solve
from quant_llm.testing.real_models import load_smollm2

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FORMATS = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_WEIGHT_ONLY_CFG", None]


def forward_step(model, batch):
    return model(**batch)


def loss_func(output, batch):
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def mix_config(choice: dict[str, str]) -> dict:
    """Weight-only config quantizing each layer with its chosen format's weight quantizer (max calibration)."""
    quant_cfg: dict = {"*": {"enable": False}}
    for layer, fmt in choice.items():
        if fmt != "None":
            quant_cfg[f"{layer}.weight_quantizer"] = getattr(mtq, fmt)["quant_cfg"][
                "*weight_quantizer"
            ]
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def random_mix(state: dict, budget_bits: float, seed: int) -> tuple[dict[str, str], float]:
    """A random choice per group that fills the budget: milp with random scores."""
    keys = list(state["groups"])
    cands = state["candidates"]
    params = {n: v["params"] for n, v in state["layers"].items()}
    costs = np.array(
        [
            [
                sum(params[n] * state["candidate_bits"][n][i] for n in state["groups"][k])
                for i in range(len(cands))
            ]
            for k in keys
        ]
    )
    rng = np.random.default_rng(seed)
    picks = solve(rng.random(costs.shape), costs, budget_bits * sum(params.values()))
    choice = {n: cands[picks[gi]] for gi, k in enumerate(keys) for n in state["groups"][k]}
    bits = sum(costs[gi, i] for gi, i in enumerate(picks)) / sum(params.values())
    return choice, float(bits)


def modelopt_search(
    task: Task, budget: float, steps: int, state: dict
) -> tuple[object, dict[str, str], float, str]:
    """ModelOpt's auto_quantize on a copy of the task's model: (its model, its choice in our names,
    its whole-model bits under quant's table, cost)."""
    fresh = copy.deepcopy(task.fp)
    with Cost() as cost:
        model, mo_state = modelopt_auto_quantize(fresh, task, budget, steps)
    recipe = {
        k.removesuffix(".quant_recipe"): str(v).split("(")[0]
        for k, v in mo_state["best"]["recipe"].items()
    }
    choice = {}
    for names in state["groups"].values():
        picked = next(recipe[n] for n in names if n in recipe)
        choice.update(dict.fromkeys(names, picked if picked in FORMATS else "None"))
    bits_per_format = dict(zip(state["candidates"], next(iter(state["candidate_bits"].values()))))
    extra = {  # layers ModelOpt searched that quant leaves out (lm_head), at their picked format
        name: bits_per_format.get(recipe.get(name, "None"), 16.0)
        for name in state["whole_model"]["excluded"]
    }
    return model, choice, whole_bits(state, choice, extra), str(cost)


def quant_auto_quantize(
    model: torch.nn.Module,
    task: Task,
    budget: float,
    method: str,
    ours: list,
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, dict]:
    """quant's ``auto_quantize`` of ``model`` with this script's candidates, batches and options."""
    return mtq.auto_quantize(
        model,
        {"effective_bits": budget},
        ours,
        task.loader,
        task.forward_step,
        task.loss_func,
        num_calib_steps=args.steps,
        num_score_steps=args.steps,
        method=method,
        count_excluded=args.count_excluded,
        verbose=False,
    )


def modelopt_auto_quantize(
    model: torch.nn.Module, task: Task, budget: float, steps: int
) -> tuple[torch.nn.Module, dict]:
    """ModelOpt's ``auto_quantize`` of ``model`` on the same candidates and batches."""
    import modelopt.torch.quantization as mq

    return mq.auto_quantize(
        model,
        constraints={"effective_bits": budget},
        quantization_formats=FORMATS[:-1],
        data_loader=task.loader,
        forward_step=task.forward_step,
        loss_func=task.loss_func,
        num_calib_steps=steps,
        num_score_steps=steps,
    )


def peak_only(task: Task, method: str, budget: float, ours: list, args: argparse.Namespace) -> None:
    """One search on the task's model itself (no copy), then the process's peak resident memory."""
    start = time.process_time()
    if method == "modelopt":
        modelopt_auto_quantize(task.fp, task, budget, args.steps)
    else:
        quant_auto_quantize(task.fp, task, budget, method, ours, args)
    cpu = time.process_time() - start
    print(
        f"{method} @{budget:g}: process peak resident {high_water_bytes() / 2**20:.0f} MiB, "
        f"search {cpu:.1f} CPU s"
    )


class Cost:
    """Wall seconds, CPU seconds and peak extra resident MiB of the block, as ``wall / cpu / MiB``."""

    def __enter__(self) -> Cost:
        self._memory = PeakMemory().__enter__()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self._memory.__exit__(*exc)

    def __str__(self) -> str:
        return f"{self.wall:.1f} / {self.cpu:.1f} / {self._memory.extra_mib:.0f}"


def bits_of(state: dict, choice: dict[str, str]) -> float:
    """Effective bits of a choice under quant's format table."""
    params = {n: v["params"] for n, v in state["layers"].items()}
    used = sum(
        params[n] * state["candidate_bits"][n][state["candidates"].index(c)]
        for n, c in choice.items()
    )
    return used / sum(params.values())


def with_lm_head(fmt: str | dict | None) -> dict | None:
    """The candidate config without its ``*lm_head*`` exclusion (None stays None)."""
    if fmt is None:
        return None
    cfg = getattr(mtq, fmt) if isinstance(fmt, str) else fmt
    entries = [e for e in cfg["quant_cfg"] if "lm_head" not in str(e.get("quantizer_name", ""))]
    return {**cfg, "quant_cfg": entries}


def whole_bits(state: dict, choice: dict[str, str], excluded_bits: dict[str, float]) -> float:
    """Effective bits over every Linear: the searched layers' choice plus the excluded ones."""
    params = {n: v["params"] for n, v in state["layers"].items()}
    excluded = state["whole_model"]["excluded"]
    used = bits_of(state, choice) * sum(params.values())
    used += sum(excluded[n] * excluded_bits[n] for n in excluded)
    return used / (sum(params.values()) + sum(excluded.values()))


@dataclass
class Task:
    """A model to search, its score batches and loss, and the quality measure of a quantized copy."""

    fp: torch.nn.Module
    loader: list[Any]
    forward_step: Callable[[torch.nn.Module, Any], Any]
    loss_func: Callable[[Any, Any], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], float]
    metric: str
    title: str


def smollm2_task(steps: int, windows: int) -> Task:
    """SmolLM2-135M: next-token loss on *Emma*, perplexity on *Pride and Prejudice* (lower is better)."""
    fp, tokenizer = load_smollm2()
    loader = list(get_calib_dataloader(tokenizer, DATA / "austen_emma.txt", 2 * steps, 512, 2))
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    return Task(
        fp,
        loader,
        forward_step,
        loss_func,
        lambda model: perplexity(model, tokenizer, text, seq_len=512, num_windows=windows),
        "perplexity",
        f"SmolLM2-135M: score on Emma ({steps}x2x512 tokens), perplexity on Pride and Prejudice "
        f"({windows}x511 tokens)",
    )


def minilm_task(steps: int, sentences: int) -> Task:
    """all-MiniLM-L6-v2: loss 1 - cosine to the fp32 embedding on *Emma*; mean cosine on *Pride and
    Prejudice* (higher is better)."""
    fp, tokenizer = load_minilm()
    calib = minilm_batches(tokenizer, austen_sentences("emma", 32 * steps), size=32)
    loader = [{**b, "target": embed(fp, [b])} for b in calib]
    held_out = minilm_batches(tokenizer, austen_sentences("prideprejudice", sentences), size=32)
    ref = embed(fp, held_out)

    def step(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def loss(output, batch):
        got = mean_pool(output.last_hidden_state, batch["attention_mask"])
        return (1 - (got * batch["target"]).sum(-1)).sum()

    return Task(
        fp,
        loader,
        step,
        loss,
        lambda model: embedding_metrics(ref, embed(model, held_out))["mean"],
        "mean cosine",
        f"all-MiniLM-L6-v2: score on Emma ({steps}x32 sentences), mean embedding cosine to fp32 on "
        f"Pride and Prejudice ({sentences} sentences)",
    )


def main() -> None:
    """Search at each budget and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--budgets", default="5,6,8")
    parser.add_argument(
        "--windows", type=int, default=4, help="SmolLM2 evaluation windows of 512 tokens"
    )
    parser.add_argument("--sentences", type=int, default=512, help="MiniLM evaluation sentences")
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="calibration and score batches (SmolLM2 2x512 tokens, MiniLM 32 sentences)",
    )
    parser.add_argument(
        "--methods",
        default="gradient_approx,gradient",
        help="quant score methods to run, comma-separated (gradient_approx, gradient, kl)",
    )
    parser.add_argument(
        "--int4-algorithm",
        choices=["max", "preset"],
        default="max",
        help="quant's INT4 candidate calibration: max (ModelOpt's preset, the same work for both "
        "tools) or quant's preset algorithm (local_hessian)",
    )
    parser.add_argument(
        "--search-lm-head",
        action="store_true",
        help="quant's candidates also quantize lm_head (their '*lm_head*' exclusion dropped), as "
        "ModelOpt's search does",
    )
    parser.add_argument(
        "--count-excluded",
        action="store_true",
        help="quant's budget counts every Linear (count_excluded=True): lm_head at 16 bits when "
        "it is not searched",
    )
    parser.add_argument(
        "--no-random", action="store_true", help="skip the uniform and random-mix rows"
    )
    parser.add_argument(
        "--peak-only",
        default=None,
        metavar="METHOD",
        help="run only this search (a quant method, or 'modelopt') at the first budget on the "
        "loaded model and print the process's peak resident memory (VmHWM, model and libraries "
        "included) and the search's CPU seconds; run each search in a fresh process",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    task = (
        smollm2_task(args.steps, args.windows)
        if args.model == "smollm2"
        else minilm_task(args.steps, args.sentences)
    )
    fp = task.fp

    def quality_of(choice: dict[str, str]) -> float:
        return task.evaluate(mtq.quantize(copy.deepcopy(fp), mix_config(choice)))

    ours = list(FORMATS)
    if args.int4_algorithm == "max":
        ours[0] = {**getattr(mtq, FORMATS[0]), "algorithm": "max"}
    if args.search_lm_head:
        ours = [with_lm_head(f) for f in ours]
    if args.peak_only:
        peak_only(task, args.peak_only, float(args.budgets.split(",")[0]), ours, args)
        return
    rows = [("fp32", 16.0, 16.0, task.evaluate(fp), "", "")]
    uniform: dict[str, tuple[float, float, float]] = {}
    for b in args.budgets.split(","):
        budget = float(b)
        for method in args.methods.split(","):
            fresh = copy.deepcopy(fp)
            with Cost() as cost:
                model, state = quant_auto_quantize(fresh, task, budget, method, ours, args)
            state["candidates"] = [str(f) for f in FORMATS]  # custom_0 -> the preset's name
            rows.append(
                (
                    f"searched @{budget:g} {method}",
                    state["effective_bits"],
                    state["whole_model"]["effective_bits"],
                    task.evaluate(model),
                    str(cost),
                    "",
                )
            )
            print(rows[-1], flush=True)
            del model
        if importlib.util.find_spec("modelopt") is not None:
            mo_model, mo_choice, mo_whole, mo_cost = modelopt_search(
                task, budget, args.steps, state
            )
            rows.append(
                (
                    f"  ModelOpt 0.47 @{budget:g}",
                    bits_of(state, mo_choice),
                    mo_whole,
                    task.evaluate(mo_model),
                    mo_cost,
                    "",
                )
            )
            print(rows[-1], flush=True)
            del mo_model
        if args.no_random:
            continue
        lm16 = dict.fromkeys(state["whole_model"]["excluded"], 16.0)
        for fmt in FORMATS[:-1]:
            bits = state["candidate_bits"][next(iter(state["layers"]))][FORMATS.index(fmt)]
            if bits <= budget:
                if fmt not in uniform:
                    choice = dict.fromkeys(state["layers"], fmt)
                    uniform[fmt] = (bits, whole_bits(state, choice, lm16), quality_of(choice))
                rows.append((f"  uniform {fmt.removesuffix('_CFG')}", *uniform[fmt], "", ""))
        mixes = [random_mix(state, budget, seed) for seed in range(5)]
        scores = [quality_of(choice) for choice, _bits in mixes]
        rows.append(
            (
                f"  random mixes (5) @{budget:g}",
                float(np.mean([b for _c, b in mixes])),
                float(np.mean([whole_bits(state, c, lm16) for c, _b in mixes])),
                float(np.mean(scores)),
                "",
                f"{min(scores):.4f}..{max(scores):.4f}",
            )
        )
        print(rows[-1], flush=True)
    print(f"\n{task.title}")
    print(
        f"| {'mix':<34} | {'eff. bits':>9} | {'all Linear':>10} | {task.metric:>11} | {'search wall s / cpu s / peak MiB':>32} | {'random range':>16} |"
    )
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 12}|{'-' * 13}|{'-' * 34}|{'-' * 18}|")
    for name, bits, whole, q, c, rng in rows:
        print(f"| {name:<34} | {bits:>9.3f} | {whole:>10.3f} | {q:>11.4f} | {c:>32} | {rng:>16} |")


if __name__ == "__main__":
    main()

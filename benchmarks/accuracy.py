"""Accuracy and calibration cost of every built-in config and algorithm on real models.

MiniLM (all-MiniLM-L6-v2): calibrate on 128 sentences of *Emma*, evaluate on 256 sentences of
*Pride and Prejudice*; report mean/min sentence-embedding cosine and nearest-neighbour
agreement against fp32, calibration wall time and peak extra memory. With ``--smollm2``, also
SmolLM2-135M perplexity on held-apart text. When ``modelopt`` imports (``nox -s modelopt --
accuracy.py`` installs it beside our packages), ModelOpt's config of the same name runs on the same data in the same run
and the table shows both and the ratio of calibration times.

    HF_HUB_OFFLINE=1 python benchmarks/accuracy.py [--only NAME ...] [--smollm2] [--no-modelopt]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _minilm import (
    austen_sentences,
    austen_text,
    batches,
    embed,
    embedding_metrics,
    load_minilm,
)

import quant_core as mtq

CALIB_SENTENCES, EVAL_SENTENCES, BATCH = 128, 256, 32


@dataclass(frozen=True)
class Case:
    """One row: a built-in config, optionally with its algorithm replaced."""

    config: str
    algorithm: Any = None

    @property
    def label(self) -> str:
        if self.algorithm is None:
            return self.config
        name = self.algorithm if isinstance(self.algorithm, str) else self.algorithm["method"]
        return f"{self.config} + {name}"


INT4 = "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"
MINILM_CASES = [
    Case("INT8_DEFAULT_CFG"),
    Case("INT8_SMOOTHQUANT_CFG"),
    Case("INT8_WEIGHT_ONLY_CFG"),
    Case("FP8_DEFAULT_CFG"),
    Case("FP8_DEFAULT_CFG", "gptq"),
    Case("FP8_PER_CHANNEL_PER_TOKEN_CFG"),
    Case("FP8_PER_CHANNEL_PER_TOKEN_CFG", "gptq"),
    Case(INT4),
    Case(INT4, "mse"),
    Case(INT4, "awq_lite"),
    Case(INT4, "awq_clip"),
    Case(INT4, "awq_full"),
    Case(INT4, "gptq"),
    Case(INT4, "awq_gptq"),
    Case("INT4_AWQ_CFG"),
    Case("W4A8_AWQ_BETA_CFG"),
    Case("W4A8_AWQ_BETA_CFG", "awq_lite"),
    Case("W4A8_AWQ_BETA_CFG", "gptq"),
    Case("NVFP4_DEFAULT_CFG"),
    Case("W4A16_NVFP4_CFG"),
    Case("W4A16_NVFP4_CFG", "mse"),
    Case("W4A16_NVFP4_CFG", "gptq"),
    Case("NVFP4_AWQ_LITE_CFG"),
    Case("NVFP4_AWQ_CLIP_CFG"),
    Case("NVFP4_AWQ_FULL_CFG"),
    Case("NVFP4_SVDQUANT_DEFAULT_CFG"),
    Case("W4A8_NVFP4_FP8_CFG"),
    Case("MXFP8_DEFAULT_CFG"),
    Case("MXFP6_DEFAULT_CFG"),
    Case("MXFP4_DEFAULT_CFG"),
    Case("MXINT8_DEFAULT_CFG"),
    Case("W4A8_MXFP4_FP8_CFG"),
]
SMOLLM_CASES = [
    Case("INT8_WEIGHT_ONLY_CFG"),
    Case(INT4),
    Case(INT4, "awq_lite"),
    Case(INT4, "awq_full"),
    Case(INT4, "gptq"),
    Case("W4A16_NVFP4_CFG"),
    Case("W4A16_NVFP4_CFG", "gptq"),
]


def novel_sentences(book: str, count: int) -> list[str]:
    """``count`` sentences of 6 to 40 words from an Austen novel, after skipping its first 40."""
    return austen_sentences(
        book, count, keep=lambda s: 6 <= len(s.split()) <= 40, boundary=r"(?<=[.!?])\s+(?=[A-Z\"'])"
    )


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_bytes() -> int:
    """This process's peak resident memory since the last reset (Linux /proc VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class PeakMemory:
    """Peak resident memory above the starting point while the block runs.

    Reads the kernel's high-water mark, reset on entry through ``/proc/self/clear_refs``, so no
    sampling thread competes for the GIL with the code being timed.
    """

    def __enter__(self) -> PeakMemory:
        self._start = resident_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = high_water_bytes()

    @property
    def extra_mib(self) -> float:
        return max(0, self.peak - self._start) / 2**20


# ----- MiniLM -----------------------------------------------------------------------------------
# ----- running one toolkit on one case ------------------------------------------------------------
@dataclass
class Result:
    metrics: dict[str, float] | None
    seconds: float
    mib: float
    error: str = ""


def run_case(
    toolkit: Any, case: Case, model: torch.nn.Module, calib: Callable, evaluate: Callable
) -> Result:
    """Quantize a copy of ``model`` with ``toolkit.quantize`` and evaluate it."""
    try:
        config = copy.deepcopy(dict(getattr(toolkit, case.config)))
    except AttributeError:
        return Result(None, 0.0, 0.0, "no such config")
    if case.algorithm is not None:
        config["algorithm"] = case.algorithm
    qmodel = copy.deepcopy(model)
    gc.collect()
    try:
        with PeakMemory() as mem, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            toolkit.quantize(qmodel, config, lambda m: calib(m))
            seconds = time.perf_counter() - start
        metrics = evaluate(qmodel)
    except Exception as exc:  # a failing config is a row in the table, not the end of the run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Result(None, 0.0, 0.0, f"{type(exc).__name__}: {first[:60]}")
    finally:
        del qmodel
        gc.collect()
    return Result(metrics, seconds, mem.extra_mib)


def modelopt_toolkit() -> Any | None:
    """ModelOpt's quantization module when it imports, else None."""
    try:
        import modelopt.torch.quantization as mo_mtq
    except Exception:
        return None
    return mo_mtq


def fmt_metric(r: Result | None, key: str, digits: int = 4) -> str:
    if r is None or r.metrics is None:
        return "–"
    return f"{r.metrics[key]:.{digits}f}"


def fmt_cost(r: Result | None) -> str:
    if r is None:
        return "not run (needs CUDA)"
    if r.metrics is None:
        return f"fails: {r.error}"
    return f"{r.seconds:.1f} s / {r.mib:.0f} MiB"


def fmt_ratio(ours: Result, other: Result | None) -> str:
    if other is None or not ours.metrics or not other.metrics or ours.seconds <= 0:
        return "–"
    return f"{other.seconds / ours.seconds:.1f}×"


def needs_cuda_in_modelopt(case: Case) -> bool:
    """ModelOpt's NVFP4 and MX numerics need CUDA; on a CPU they are not attempted."""
    return any(tag in case.config for tag in ("NVFP4", "MX"))


def run_both(
    theirs: Any | None, case: Case, model: torch.nn.Module, calib: Callable, evaluate: Callable
) -> tuple[Result, Result | None]:
    ours = run_case(mtq, case, model, calib, evaluate)
    other = None
    if theirs is not None and not needs_cuda_in_modelopt(case):
        other = run_case(theirs, case, model, calib, evaluate)
    return ours, other


def comparison_table(
    cases: list[Case],
    theirs: Any | None,
    model: torch.nn.Module,
    calib: Callable[[torch.nn.Module], None],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    header: list[str],
    our_cells: Callable[[Result], list[str]],
    their_metric: tuple[str, Callable[[Result | None], str]],
) -> list[str]:
    """Print (row by row, as results come) and return a markdown table of ours vs ModelOpt per case."""
    if theirs is not None:
        header = [
            *header,
            f"ModelOpt {their_metric[0]}",
            "ModelOpt calib time / peak mem",
            "time ratio (theirs/ours)",
        ]
    lines = ["| " + " | ".join(["config", *header]) + " |", "|" + "---|" * (len(header) + 1)]
    print("\n".join(lines), flush=True)
    for case in cases:
        ours, other = run_both(theirs, case, model, calib, evaluate)
        row = [case.label, *our_cells(ours)]
        if theirs is not None:
            row += [their_metric[1](other), fmt_cost(other), fmt_ratio(ours, other)]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    return lines


def minilm_table(cases: list[Case], theirs: Any | None) -> list[str]:
    model, tokenizer = load_minilm()
    calib_data = batches(
        tokenizer, novel_sentences("emma", CALIB_SENTENCES), size=BATCH, sort_by_length=True
    )
    eval_data = batches(
        tokenizer,
        novel_sentences("prideprejudice", EVAL_SENTENCES),
        size=BATCH,
        sort_by_length=True,
    )
    reference = embed(model, eval_data)

    def calib(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calib_data:
                m(**batch)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return embedding_metrics(reference, embed(m, eval_data))

    return comparison_table(
        cases,
        theirs,
        model,
        calib,
        evaluate,
        header=["cosine mean", "cosine min", "NN agree", "calib time / peak mem"],
        our_cells=lambda r: [
            fmt_metric(r, "mean"),
            fmt_metric(r, "min"),
            fmt_metric(r, "nn", 3),
            fmt_cost(r),
        ],
        their_metric=("cosine mean", lambda r: fmt_metric(r, "mean")),
    )


# ----- SmolLM2 ------------------------------------------------------------------------------------
def smollm_table(cases: list[Case], theirs: Any | None) -> list[str]:
    from quant_llm.calib_data import tokenize_windows
    from quant_llm.evaluation import perplexity
    from quant_llm.testing.real_models import load_smollm2

    model, tokenizer = load_smollm2()
    calib_ids = tokenize_windows(tokenizer, austen_text("emma"), 512, 32)
    eval_text = austen_text("prideprejudice")

    def calib(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(calib_ids), 4):
                m(input_ids=calib_ids[i : i + 4])

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return {"ppl": perplexity(m, tokenizer, eval_text, seq_len=1024, num_windows=20)}

    base = evaluate(model)["ppl"]
    return comparison_table(
        cases,
        theirs,
        model,
        calib,
        evaluate,
        header=[f"perplexity (fp32 {base:.2f})", "increase", "calib time / peak mem"],
        our_cells=lambda r: [
            fmt_metric(r, "ppl", 2),
            f"+{r.metrics['ppl'] - base:.2f}" if r.metrics else "–",
            fmt_cost(r),
        ],
        their_metric=("perplexity", lambda r: fmt_metric(r, "ppl", 2)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", help="run only the rows whose label contains one of these"
    )
    parser.add_argument(
        "--smollm2", action="store_true", help="also run SmolLM2-135M perplexity (minutes)"
    )
    parser.add_argument(
        "--no-modelopt", action="store_true", help="do not run ModelOpt even if installed"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    theirs = None if args.no_modelopt else modelopt_toolkit()

    def pick(cases: list[Case]) -> list[Case]:
        return [c for c in cases if not args.only or any(o in c.label for o in args.only)]

    mo = (
        "not installed"
        if theirs is None
        else getattr(sys.modules.get("modelopt"), "__version__", "yes")
    )
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}; ModelOpt {mo}"
    )
    print(
        "\n### MiniLM (all-MiniLM-L6-v2): 128 calibration sentences (Emma), 256 evaluation (Pride and Prejudice)\n"
    )
    minilm_table(pick(MINILM_CASES), theirs)
    if args.smollm2:
        print(
            "\n### SmolLM2-135M: perplexity on 20 windows of 1,024 tokens of Pride and Prejudice\n"
        )
        smollm_table(pick(SMOLLM_CASES), theirs)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""quant-core on the real all-MiniLM-L6-v2: every built-in config's embedding fidelity and quantize time.

Calibrates on 128 sentences of *Emma*, evaluates on 256 held-apart sentences of *Pride and
Prejudice* (../shared/data), and prints a markdown table: mean and minimum cosine of the quantized
vs fp32 sentence embeddings, the seconds ``mtq.quantize`` took (calibration included; the algorithm
column counts the inputs max's per-token fallback switched), and the
evaluation forward time before and after ``mtq.fold_weight`` (the same outputs, faster). Configs
that enable no quantizer in this model (KV-cache configs without an attention plugin) are listed as
not applicable. The machine may be shared: quantize times are single runs, forward times the median
of ``--repeats`` passes.

    python benchmarks/core_minilm.py [--configs INT8_DEFAULT_CFG FP8_DEFAULT_CFG] [--calib 128] [--eval 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
from _minilm import austen_sentences, batches, embed, embedding_metrics, load_minilm

import quant_core as mtq
from quant_core.conversion import iter_quantizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_embed(
    model: torch.nn.Module, data: list[dict[str, torch.Tensor]], repeats: int
) -> tuple[torch.Tensor, float]:
    """Embeddings and the median wall time of ``repeats`` evaluation passes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = embed(model, data)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="*", default=sorted(mtq.choices), choices=sorted(mtq.choices)
    )
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="timed evaluation passes (median)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    mtq.plugins.load_plugins()  # one-off plugin start-up is not part of any config's quantize time
    reference, tokenizer = load_minilm()
    calib = batches(tokenizer, austen_sentences("emma", args.calib))
    held_apart = batches(tokenizer, austen_sentences("prideprejudice", args.eval), size=64)
    fp32, fp32_seconds = timed_embed(reference, held_apart, args.repeats)

    print(
        f"all-MiniLM-L6-v2: {args.calib} calibration sentences (Emma), {args.eval} evaluation (Pride and Prejudice)"
    )
    print(f"fp32 evaluation forward: {fp32_seconds:.2f} s (median of {args.repeats})\n")
    print(
        "| config | algorithm | mean cosine | min cosine | quantize (s) | eval fwd (s) | after fold_weight (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        config = getattr(mtq, name)
        algorithm = config["algorithm"]
        algo = algorithm["method"] if isinstance(algorithm, dict) else str(algorithm)
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mtq.quantize(model, config, lambda m: [m(**b) for b in calib])
        seconds = time.perf_counter() - start
        if not any(q.is_enabled for _n, q, _p in iter_quantizers(model)):
            print(
                f"| {name} | {algo} | n/a (no quantizer enabled in this model) | | {seconds:.1f} | | |"
            )
            continue
        switched = sum(
            getattr(q, "fallback", None) is not None for _n, q, _p in iter_quantizers(model)
        )
        if switched:
            algo += f" ({switched} inputs per-token)"
        quant, fwd = timed_embed(model, held_apart, args.repeats)
        metrics = embedding_metrics(fp32, quant)
        mtq.fold_weight(model)
        folded, fwd_folded = timed_embed(model, held_apart, args.repeats)
        same = "" if torch.equal(folded, quant) else " (outputs changed!)"
        print(
            f"| {name} | {algo} | {metrics['mean']:.4f} | {metrics['min']:.4f} | {seconds:.1f} | {fwd:.2f} | "
            f"{fwd_folded:.2f}{same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

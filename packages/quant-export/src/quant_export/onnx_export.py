"""``export_onnx``: a quant-core model to a deployable ONNX Q/DQ graph, written atomically.

Pipeline: check the output path is writable; swap every active quantizer for a marker
(:mod:`quant_export.quantizers`); trace with ``torch.onnx.export`` (TorchScript exporter, opset
20, dynamic batch/sequence axes); lower the markers (:mod:`quant_export.lowering`); clean the graph
(:mod:`quant_export.cleanup`); raise the opset to what the stored types need (21 for INT4 and
blocked DequantizeLinear, 23 for FP4); check; write.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from quant_core.atomic import atomic_temp
from quant_core.model_tools import eval_mode
from quant_export.cleanup import clean
from quant_export.export_checks import run_on_sample, warn_folded_weights
from quant_export.lowering import TRT_DOMAIN, Lowering
from quant_export.quantizers import MARKER_DOMAIN, marked_quantizers, refuse_compressed

TRACE_OPSET = 20
_EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GiB limit, with room for the graph


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before any export work) when ``path`` cannot be written; returns it as a Path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(
            f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}"
        )
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write {path}: no write permission")
    return path


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` through a temporary file and ``os.replace`` (never a partial file)."""
    path = Path(path)
    tmp = atomic_temp(path)
    try:
        if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
            raise ValueError(
                f"model is {model.ByteSize() / 2**30:.1f} GiB; files over 2 GiB are not supported yet"
            )
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _as_tuple(sample_inputs: Any) -> tuple[Any, ...]:
    if isinstance(sample_inputs, torch.Tensor):
        return (sample_inputs,)
    if isinstance(sample_inputs, Mapping):
        return (dict(sample_inputs),)
    return tuple(sample_inputs)


def _flat_inputs(args: tuple[Any, ...]) -> list[tuple[str | None, torch.Tensor]]:
    """(keyword name or None, tensor) for the tensors the exporter turns into graph inputs."""
    if len(args) == 1 and isinstance(args[0], dict):
        return [(k, v) for k, v in args[0].items() if isinstance(v, torch.Tensor)]
    return [(None, a) for a in args if isinstance(a, torch.Tensor)]


def default_dynamic_axes(
    inputs: Sequence[tuple[str, torch.Tensor]], output_names: Sequence[str]
) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output is ``batch``; integer (token) inputs also get axis 1 ``sequence``."""
    axes: dict[str, dict[int, str]] = {}
    has_sequence = False
    for name, tensor in inputs:
        axes[name] = {0: "batch"} if tensor.dim() >= 1 else {}
        if tensor.dim() >= 2 and not tensor.is_floating_point():
            axes[name][1] = "sequence"
            has_sequence = True
    for name in output_names:
        axes[name] = {0: "batch", 1: "sequence"} if has_sequence else {0: "batch"}
    return axes


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping):
        out = [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [f"output_{i}" for i in range(len(out))]


def _trace(
    model: nn.Module, args: tuple[Any, ...], input_names, output_names, dynamic_axes
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        torch.onnx.export(
            model,
            args,
            buffer,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=TRACE_OPSET,
            do_constant_folding=True,
            custom_opsets={MARKER_DOMAIN: 1},
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _finish_opsets(model: onnx.ModelProto, uses_fp4: bool, uses_trt: bool) -> None:
    """Raise the default-domain opset (types only change from 20 to 23) and declare the trt domain."""
    wanted = 23 if uses_fp4 else 21
    imports = [
        o for o in model.opset_import if o.domain not in ("", "ai.onnx", MARKER_DOMAIN, TRT_DOMAIN)
    ]
    imports.append(onnx.helper.make_opsetid("", wanted))
    if uses_trt:
        imports.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    model.ir_version = max(model.ir_version, 10 if uses_fp4 else 9)


def export_onnx(
    model: nn.Module,
    sample_inputs: Any,
    path: str | os.PathLike[str],
    *,
    target: str = "onnxruntime",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export a (quant-core quantized) model to ONNX with stored-quantized weights and Q/DQ activations.

    ``sample_inputs`` is a tensor, a tuple of positional tensors, or a dict of keyword tensors.
    ``target`` is ``"onnxruntime"`` (standard ops only) or ``"tensorrt"`` (also TensorRT's FP4/MXFP8
    custom ops). Returns the written path.
    """
    refuse_compressed(model)
    path = check_writable(path)
    args = _as_tuple(sample_inputs)
    flat = _flat_inputs(args)
    input_names = list(input_names or [k or f"input_{i}" for i, (k, _) in enumerate(flat)])
    warn_folded_weights(model)
    with eval_mode(model):  # each module's train/eval mode comes back afterwards
        sample_out = run_on_sample(model, args)
        with marked_quantizers(model) as specs:
            if not specs:
                warnings.warn(
                    f"{type(model).__name__} has no active quantizers; exporting it as a plain fp32 graph",
                    UserWarning,
                    stacklevel=2,
                )
            output_names = list(output_names or _output_names(sample_out))
            axes = dynamic_axes or default_dynamic_axes(
                list(zip(input_names, (t for _, t in flat))), output_names
            )
            traced = _trace(
                model, args, input_names, output_names, {k: dict(v) for k, v in axes.items()}
            )
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(traced))
    lowering = Lowering(graph, specs, target)
    lowering.run()
    clean(graph)
    exported = gs.export_onnx(graph, do_type_check=False)
    exported.producer_name = "quant-export"
    _finish_opsets(exported, lowering.uses_fp4, lowering.uses_trt)
    if not lowering.uses_trt:
        onnx.checker.check_model(exported)
    with contextlib.suppress(Exception):
        exported = onnx.shape_inference.infer_shapes(exported)
    return save_atomic(exported, path)


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


def export_layout(model: nn.Module, out: Path, _dtype: Any, sample: Any, _args: Any) -> Path:
    """The ``onnx`` row's writer (:mod:`quant_export.layouts`): the causal LM's logits graph as
    ``out/model.onnx`` for the tensorrt target (standard Q/DQ plus TensorRT's NVFP4 / MXFP8
    activation ops)."""
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(_LogitsOnly(model), {"input_ids": sample}, out / "model.onnx", target="tensorrt")
    return out


def is_onnx_folder(folder: Path) -> bool:
    """Whether ``folder`` holds the ``onnx`` layout: a ``model.onnx`` without an onnxruntime-genai
    config (the registry's recogniser)."""
    return (folder / "model.onnx").is_file() and not (folder / "genai_config.json").is_file()


def check_layout(folder: Path) -> dict[str, Any]:
    """The ``onnx`` row's validator: ONNX's checker on ``folder/model.onnx``."""
    onnx.checker.check_model(str(folder / "model.onnx"))
    return {"layers": []}

"""``verify_onnx``: run an exported graph in onnxruntime and compare it with the PyTorch fake-quant model."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from quant_core.model_tools import eval_mode

__all__ = ["VerifyReport", "ort_integer_matmul_saturates", "run_onnx", "verify_onnx"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class VerifyReport:
    """Errors of the ONNX outputs against PyTorch's, over all outputs together."""

    max_abs_error: float
    rel_error: float  # ||onnx - torch|| / ||torch||
    outputs: int

    def __str__(self) -> str:
        return f"max abs error {self.max_abs_error:.3g}, relative error {self.rel_error:.3g} over {self.outputs} output(s)"


def _torch_outputs(model: nn.Module, inputs: Any) -> list[np.ndarray]:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, torch.Tensor):
            out = model(inputs)
        else:
            out = model(*inputs)
    if isinstance(out, torch.Tensor):
        out = [out]
    elif isinstance(out, Mapping):
        out = [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [o.detach().float().cpu().numpy() for o in out]


def _feeds(session: ort.InferenceSession, inputs: Any) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        tensors = [inputs[n] for n in names]
    else:
        tensors = (
            [inputs]
            if isinstance(inputs, torch.Tensor)
            else [t for t in inputs if isinstance(t, torch.Tensor)]
        )
    if len(tensors) != len(names):
        raise ValueError(f"the graph takes inputs {names}, got {len(tensors)} tensor(s)")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def run_onnx(
    path: str | os.PathLike[str], inputs: Any, optimization: str = "all"
) -> list[np.ndarray]:
    """Outputs of the graph at ``path`` in onnxruntime (CPU) for the given torch inputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, _feeds(session, inputs))


def verify_onnx(
    path: str | os.PathLike[str], model: nn.Module, inputs: Any, *, optimization: str = "all"
) -> VerifyReport:
    """Run ``path`` in onnxruntime and report its max and relative error against ``model(inputs)``.

    ``optimization`` is onnxruntime's graph optimization level: ``disable``, ``basic``,
    ``extended`` or ``all`` (what a deployment uses).
    """
    if optimization not in _LEVELS:
        raise ValueError(f"optimization must be one of {sorted(_LEVELS)}, got {optimization!r}")
    with eval_mode(model):  # the user's train/eval mode comes back afterwards
        expected = _torch_outputs(model, inputs)
    got = run_onnx(path, inputs, optimization)
    if len(got) != len(expected):
        raise ValueError(f"the graph has {len(got)} outputs, the model {len(expected)}")
    report = _compare(got, expected)
    if optimization in ("extended", "all") and report.rel_error > 1e-3:
        _warn_if_saturated(path, inputs, expected, report, optimization)
    return report


def _compare(got: list[np.ndarray], expected: list[np.ndarray]) -> VerifyReport:
    diff = np.concatenate([(g.astype(np.float64) - e).ravel() for g, e in zip(got, expected)])
    ref = np.concatenate([e.astype(np.float64).ravel() for e in expected])
    return VerifyReport(
        max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
        rel_error=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        outputs=len(got),
    )


def _warn_if_saturated(
    path: str | os.PathLike[str],
    inputs: Any,
    expected: list[np.ndarray],
    report: VerifyReport,
    optimization: str,
) -> None:
    """Name onnxruntime's integer-matmul saturation when it, not the graph, explains the error."""
    if not ort_integer_matmul_saturates():
        return
    unfused = _compare(run_onnx(path, inputs, "basic"), expected)
    if unfused.rel_error >= report.rel_error / 10:
        return
    warnings.warn(
        f"onnxruntime's fused integer MatMul saturates on this CPU (x86 without VNNI adds pairs of "
        f"uint8 x int8 products in int16): relative error {report.rel_error:.3g} at "
        f"optimization={optimization!r}, {unfused.rel_error:.3g} for the same graph at 'basic'. "
        "The graph is right; on this CPU run it with optimization 'basic' or the session option "
        "session.disable_quant_qdq=1, or deploy on a CPU with VNNI or on TensorRT",
        UserWarning,
        stacklevel=3,
    )


@functools.cache
def ort_integer_matmul_saturates() -> bool:
    """Whether onnxruntime's CPU integer matmul saturates on this machine.

    On x86 CPUs without VNNI its U8S8 kernel (which the Q/DQ fusions at optimization levels
    ``extended`` and ``all`` use) adds pairs of uint8 x int8 products in int16 (VPMADDUBSW), so a
    sum like ``255 * 127 + 255 * 127`` clips at 32767. Probed once with a ``MatMulInteger``.
    """
    k = 64
    weight = helper.make_tensor(
        "B", TensorProto.INT8, [k, 1], np.full((k, 1), 127, np.int8).tobytes(), raw=True
    )
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "saturation_probe",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"A": np.full((1, k), 255, np.uint8)})
    return int(out.reshape(-1)[0]) != 255 * 127 * k

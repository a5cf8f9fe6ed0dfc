"""``verify_onnx``: run an exported graph in onnxruntime and compare it with the PyTorch fake-quant model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from quant_core.model_tools import eval_mode

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
    diff = np.concatenate([(g.astype(np.float64) - e).ravel() for g, e in zip(got, expected)])
    ref = np.concatenate([e.astype(np.float64).ravel() for e in expected])
    return VerifyReport(
        max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
        rel_error=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        outputs=len(got),
    )

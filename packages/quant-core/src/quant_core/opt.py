"""ModelOpt's ``modelopt.torch.opt`` checkpoint API for quantized models (``import quant_core.opt as mto``).

``save`` / ``restore`` write and read one safetensors file (weights, quantizer buffers and the
quantizer state as JSON; no pickle). ``modelopt_state`` / ``restore_from_modelopt_state`` give
and take the quantizer state as a dict of JSON values and tensors, for ``torch.save`` and
``torch.load(..., weights_only=True)`` beside a model's own checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from quant_core import save_restore


def _path(f: Any, what: str) -> str | os.PathLike[str]:
    if not isinstance(f, (str, os.PathLike)):
        raise TypeError(
            f"mto.{what} takes a file path here, got {type(f).__name__}; file objects are not "
            "supported (the file is written atomically by path)"
        )
    return f


def _model(model: Any, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"mto.{what} takes the model instance (build it first), got {type(model).__name__}"
        )
    return model


def save(model: nn.Module, f: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights and quantization state to the file ``f`` (safetensors, atomic)."""
    save_restore.save(_model(model, "save"), _path(f, "save"))


def restore(model: nn.Module, f: str | os.PathLike[str]) -> nn.Module:
    """Quantize ``model`` (a fresh copy of the original) as saved in ``f`` and load its weights."""
    return save_restore.restore(_model(model, "restore"), _path(f, "restore"))


def modelopt_state(model: nn.Module) -> dict[str, Any]:
    """The quantization state of ``model`` (modules converted, quantizer attributes and buffers)."""
    return save_restore.quantizer_state(model)


def restore_from_modelopt_state(
    model: nn.Module,
    modelopt_state: dict[str, Any] | None = None,
    modelopt_state_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Re-create the quantized modules and quantizers of a state (given, or ``torch.save``'d at a path)."""
    if (modelopt_state is None) == (modelopt_state_path is None):
        raise ValueError("give exactly one of modelopt_state and modelopt_state_path")
    if modelopt_state is None:
        modelopt_state = torch.load(modelopt_state_path, map_location="cpu", weights_only=True)
    return save_restore.restore_quantizer_state(
        _model(model, "restore_from_modelopt_state"), modelopt_state
    )


__all__ = ["modelopt_state", "restore", "restore_from_modelopt_state", "save"]

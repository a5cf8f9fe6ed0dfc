"""Save and restore quantized models without pickle: JSON quantizer attributes plus safetensors tensors.

``save(model, path)`` writes one safetensors file holding the whole ``state_dict`` (weights and
quantizer buffers) with the quantizer state as JSON in its metadata, atomically (temp file, then
``os.replace``). ``restore(model, path)`` converts a fresh copy of the original model to the same
quantized classes, recreates every quantizer and loads the tensors, so outputs match bit for bit.
``quantizer_state`` / ``restore_quantizer_state`` do the same with a plain dict of JSON values and
tensors, for use in any checkpointing loop (``torch.save`` it; load with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from quant_core.config.schema import parse_attributes
from quant_core.conversion import (
    convert_module,
    iter_quantizers,
    iter_tensor_quantizers,
    name_quantizers,
)
from quant_core.nn.registry import QuantModuleRegistry
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer
from quant_core.plugins import load_plugins

FORMAT = "quant_core.quantizer_state"
VERSION = 1
_METADATA_KEY = "quant_core"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def quantizer_state(model: nn.Module) -> dict[str, Any]:
    """The quantization state of ``model``: converted modules, quantizer attributes and buffers."""
    modules = {
        name: {"original": m._quant_original_key, "quantized": _qualname(type(m))}
        for name, m in model.named_modules()
        if getattr(m, "_quant_original_key", None) is not None
    }
    sequential = {
        name: len(q) for name, q, _p in iter_quantizers(model) if isinstance(q, SequentialQuantizer)
    }
    quantizers: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, q in iter_tensor_quantizers(model):
        own = {**dict(q.named_buffers(recurse=False)), **dict(q.named_parameters(recurse=False))}
        quantizers[name] = {
            "attributes": q.attribute_config.to_json_dict(),
            "enabled": q.is_enabled,
            "tensors": {k: list(v.shape) for k, v in own.items()},
        }
        tensors.update({f"{name}.{k}": v.detach().clone() for k, v in own.items()})
    return {
        "format": FORMAT,
        "version": VERSION,
        "modules": modules,
        "sequential": sequential,
        "quantizers": quantizers,
        "tensors": tensors,
    }


def _check_state(state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a quant_core quantizer state (missing format marker)")
    if state.get("version") != VERSION:
        raise ValueError(
            f"quantizer state version {state.get('version')!r} is not supported (expected {VERSION})"
        )


def restore_quantizer_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Re-create the quantized modules and quantizers of ``state`` on ``model`` (a copy of the original)."""
    _check_state(state)
    load_plugins()
    for name, info in state["modules"].items():
        module = model.get_submodule(name)
        if getattr(module, "_quant_original_key", None) is None:
            quantized_cls = QuantModuleRegistry.get(type(module))
            if quantized_cls is None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) has no registered quantized class"
                )
            convert_module(module, quantized_cls)
        if _qualname(type(module)) != info["quantized"]:
            raise ValueError(
                f"module {name!r} converts to {_qualname(type(module))} now, but was saved as {info['quantized']}; "
                "register the same quantized class before restoring"
            )
    for name, stages in state.get("sequential", {}).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, SequentialQuantizer(*(TensorQuantizer() for _ in range(stages))))
    tensors = state.get("tensors", {})
    for name, info in state["quantizers"].items():
        quantizer = model.get_submodule(name)
        if not isinstance(quantizer, TensorQuantizer):
            raise ValueError(f"{name!r} is not a TensorQuantizer in this model")
        quantizer.set_from_attribute_config(parse_attributes(info["attributes"], f" for {name}"))
        quantizer.enable() if info["enabled"] else quantizer.disable()
        for key, shape in info["tensors"].items():
            value = tensors.get(f"{name}.{key}", torch.zeros(shape))
            _set_tensor(quantizer, key, value)
    name_quantizers(model)
    return model


def _set_tensor(quantizer: TensorQuantizer, key: str, value: torch.Tensor) -> None:
    if key == "_amax":
        quantizer.amax = None
        quantizer.amax = value
    elif key == "_pre_quant_scale":
        quantizer.pre_quant_scale = value
    else:
        quantizer.register_buffer(key, value.detach().clone())


def _atomic_target(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights, quantizer buffers and quantizer state to one safetensors file, atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: folder {path.parent} does not exist")
    state = quantizer_state(model)
    state.pop("tensors")
    tmp = _atomic_target(path)
    try:
        save_model(model, tmp, metadata={_METADATA_KEY: json.dumps(state)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Restore a model written by :func:`save` onto ``model`` (a fresh copy of the original model)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} was not written by quant_core.save (no quantizer state in its metadata)"
        )
    restore_quantizer_state(model, json.loads(metadata[_METADATA_KEY]))
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model

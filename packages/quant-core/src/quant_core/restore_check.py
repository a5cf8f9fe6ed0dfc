"""Checks that a saved quantizer state fits the target model, run before ``restore`` converts anything.

A restore into the wrong architecture (a missing or different module, a weight of another shape)
is refused here, while the target model is still unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quant_core.diagnostics import name_list
from quant_core.nn.registry import QuantModuleRegistry

__all__ = ["check_state_fits", "read_metadata_json", "unsaved_modules"]


def read_metadata_json(path: str | Path, text: str, what: str) -> Any:
    """``json.loads(text)``, with an error naming the file and the record when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: the {what} in its metadata is not valid JSON ({err}); the file is corrupted "
            "or was not written by quant_core.save"
        ) from None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_modules(model: nn.Module, modules: dict[str, Any]) -> None:
    for name, info in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the saved state quantizes module {name!r}, which {type(model).__name__} does not "
                "have: restore into a fresh copy of the same architecture the state was saved from"
            ) from None
        if getattr(module, "_quant_original_key", None) is not None:
            current = type(module)
        else:
            current = QuantModuleRegistry.get(type(module))
            if current is None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) has no registered quantized class, "
                    f"but was saved as {info.get('quantized')}"
                )
        if _qualname(current) != info.get("quantized"):
            raise ValueError(
                f"module {name!r} converts to {_qualname(current)} now, but was saved as "
                f"{info.get('quantized')}; register the same quantized class before restoring"
            )
        saved_shape = info.get("compressed", {}).get("weight_shape")
        weight = getattr(module, "weight", None)
        shape_differs = isinstance(weight, torch.Tensor) and list(weight.shape) != saved_shape
        if saved_shape is not None and shape_differs:
            raise ValueError(
                f"module {name!r} was saved compressed with a {tuple(saved_shape)} weight, but "
                f"the model's is {tuple(weight.shape)}: its packed codes would be read as "
                "another matrix; restore into the architecture the state was saved from"
            )


def check_state_fits(
    model: nn.Module, state: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Refuse ``state`` (and, with ``shapes``, the saved tensors' shapes by key) for ``model`` before any change.

    Checked: every saved module exists and converts to the class it was saved as; with ``shapes``,
    every saved tensor that the model already has has the same shape, and every saved tensor the
    model lacks belongs to a quantizer or a converted module of the state.
    """
    _check_modules(model, state.get("modules", {}))
    extra = unsaved_modules(model, state)
    if shapes is not None:
        _check_missing(model, state, shapes, extra)
    if extra:
        from quant_core.diagnostics import warn

        warn(
            f"{type(model).__name__} has quantizable module(s) the saved state does not have: "
            f"{name_list(extra)}; they stay unquantized. Restore into the architecture the state "
            "was saved from, or quantize them afterwards",
            stacklevel=3,
        )
    if shapes is None:
        return
    owners = set(state.get("quantizers", {})) | set(state.get("modules", {}))
    current = model.state_dict()
    wrong, foreign = [], []
    for key, shape in shapes.items():
        if key in current:
            if isinstance(current[key], torch.Tensor) and tuple(current[key].shape) != tuple(shape):
                wrong.append(
                    f"{key} {tuple(shape)} saved, {tuple(current[key].shape)} in the model"
                )
        elif key.rpartition(".")[0] not in owners:
            foreign.append(key)
    if wrong or foreign:
        details = "; ".join(
            ([f"shape mismatch: {', '.join(wrong[:3])}"] if wrong else [])
            + ([f"saved tensors the model has no place for: {foreign[:5]}"] if foreign else [])
        )
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__} ({details}); nothing was changed. "
            "Restore into a fresh copy of the architecture the checkpoint was saved from."
        )


def unsaved_modules(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Modules of ``model`` that quantize would convert (a registered class) but ``state`` does not
    hold: the model has a layer the saved one did not have."""
    saved = state.get("modules", {})
    out = []
    for name, module in model.named_modules():
        if not name or name in saved or any(name.startswith(f"{s}.") for s in saved):
            continue
        converted = getattr(module, "_quant_original_key", None) is not None
        if converted or QuantModuleRegistry.get(type(module)) is not None:
            out.append(name)
    return out


def _check_missing(
    model: nn.Module, state: dict[str, Any], shapes: dict[str, tuple[int, ...]], extra: list[str]
) -> None:
    """Refuse, before any change, a model with tensors that the file lacks (an extra layer)."""
    saved = set(state.get("modules", {}))
    tensors = {k: t for k, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    present = {t.data_ptr() for k, t in tensors.items() if k in shapes and t.numel()}
    missing = []
    for key, tensor in tensors.items():  # extra states (not tensors) are checked by restore
        owner = key.rpartition(".")[0]
        if key in shapes or owner in saved or (tensor.numel() and tensor.data_ptr() in present):
            continue  # saved, or replaced by its module's saved form, or tied to a saved tensor
        missing.append(key)
    if missing:
        modules = sorted({k.rpartition(".")[0] for k in missing})
        hint = (
            f" (quantizable module(s) the saved model did not have: {name_list(extra)})"
            if extra
            else ""
        )
        raise ValueError(
            f"the checkpoint has no values for {name_list(missing)}{hint}; nothing was changed. "
            f"Restore into the architecture it was saved from (without {name_list(modules, 3)})."
        )

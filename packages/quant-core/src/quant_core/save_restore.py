"""Save and restore quantized models without pickle: JSON quantizer attributes plus safetensors tensors.

``save(model, path)`` writes one safetensors file holding the whole ``state_dict`` (weights and
quantizer buffers) with the quantizer state as JSON in its metadata, atomically (temp file, then
``os.replace``). ``restore(model, path)`` converts a fresh copy of the original model to the same
quantized classes, recreates every quantizer and loads the tensors, so outputs match bit for bit.
Non-tensor ``state_dict`` entries (a module's ``_extra_state``, e.g. megatron-core's ``None`` or
Transformer Engine's serialized bytes) are kept too: ``None`` and JSON values in the metadata
(tuples come back as lists), ``bytes`` / ``io.BytesIO`` as uint8 tensors; any other object is
refused by name, never pickled. Tensors that share storage (tied weights) are written once and
refilled from their twin on restore.
``quantizer_state`` / ``restore_quantizer_state`` do the same with a plain dict of JSON values and
tensors, for use in any checkpointing loop (``torch.save`` it; load with ``weights_only=True``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quant_core.atomic import atomic_temp
from quant_core.compress.module import CompressedLinear, recompress
from quant_core.config.schema import parse_attributes
from quant_core.conversion import (
    iter_quantizers,
    iter_tensor_quantizers,
    name_quantizers,
)
from quant_core.input_groups import record_from_json, record_to_json
from quant_core.nn.lsq import LSQ_TENSORS, LSQState, enable_lsq
from quant_core.nn.registry import QuantModuleRegistry, convert_module
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer
from quant_core.plugins import prepare_model
from quant_core.restore_check import check_state_fits, read_metadata_json

FORMAT = "quant_core.quantizer_state"
VERSION = 1
_METADATA_KEY = "quant_core"
_EXTRA_METADATA_KEY = "quant_core.extra_state"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def quantizer_state(model: nn.Module) -> dict[str, Any]:
    """The quantization state of ``model``: converted modules, quantizer attributes and buffers."""
    modules = {
        name: {"original": m._quant_original_key, "quantized": _qualname(type(m))}
        for name, m in model.named_modules()
        if getattr(m, "_quant_original_key", None) is not None
    }
    modules.update(
        {n: dict(m.source) for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    )
    for name, info in modules.items():
        branch = getattr(model.get_submodule(name), "low_rank_branch", None)
        if branch is not None:
            info["low_rank"] = [list(branch[0].shape), list(branch[1].shape)]
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
        if q.lsq_state is not None:
            quantizers[name]["lsq"] = q.lsq_state.to_json()
        tensors.update({f"{name}.{k}": v.detach().clone() for k, v in own.items()})
    return {
        "format": FORMAT,
        "version": VERSION,
        "modules": modules,
        "sequential": sequential,
        "quantizers": quantizers,
        "tensors": tensors,
        "input_groups": record_to_json(model),
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
    check_state_fits(model, state)
    prepare_model(model)
    for name, info in state["modules"].items():
        module = model.get_submodule(name)
        if getattr(module, "_quant_original_key", None) is None:
            quantized_cls = QuantModuleRegistry.get(type(module))
            if quantized_cls is None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) has no registered quantized class"
                )
            convert_module(module, quantized_cls, name)
        if _qualname(type(module)) != info["quantized"]:
            raise ValueError(
                f"module {name!r} converts to {_qualname(type(module))} now, but was saved as {info['quantized']}; "
                "register the same quantized class before restoring"
            )
        if (
            "low_rank" in info
        ):  # SVDQuant's branch: recreated here, its values come with the weights
            shape_a, shape_b = info["low_rank"]
            module.set_low_rank_branch(torch.zeros(shape_a), torch.zeros(shape_b))
    for name, stages in state.get("sequential", {}).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, SequentialQuantizer(*(TensorQuantizer() for _ in range(stages))))
    tensors = state.get("tensors", {})
    for name, info in state["quantizers"].items():
        quantizer = model.get_submodule(name)
        if not isinstance(quantizer, TensorQuantizer):
            raise ValueError(f"{name!r} is not a TensorQuantizer in this model")
        _restore_quantizer(quantizer, name, info, tensors, torch.zeros)
    for name, info in state["modules"].items():
        if "compressed" in info:  # placeholder amax of ones: the packed buffers come with the file
            module = model.get_submodule(name)
            record = info["compressed"]
            wq_name = f"{name}.weight_quantizer"
            _restore_quantizer(
                module.weight_quantizer, wq_name, record["weight_quantizer"], {}, torch.ones
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, recompress(module, name, record))
    name_quantizers(model)
    record_from_json(model, state.get("input_groups"))
    return model


def _restore_quantizer(
    quantizer: TensorQuantizer,
    name: str,
    info: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    fill: Callable[[list[int]], torch.Tensor],
) -> None:
    """Attributes, enabled flag and tensors of one saved quantizer (``fill(shape)`` where none was saved)."""
    quantizer.set_from_attribute_config(parse_attributes(info["attributes"], f" for {name}"))
    quantizer.enable() if info["enabled"] else quantizer.disable()
    values = {k: tensors.get(f"{name}.{k}", fill(shape)) for k, shape in info["tensors"].items()}
    if "lsq" in info:  # learned amaxes: parameters or buffers as they were
        lsq_values = {k: values.pop(k) for k in LSQ_TENSORS if k in values}
        enable_lsq(quantizer, LSQState.from_json(info["lsq"]), lsq_values)
    for key, value in sorted(values.items(), key=lambda kv: kv[0] != "_amax"):  # amax first
        _set_tensor(quantizer, key, value)


def _set_tensor(quantizer: TensorQuantizer, key: str, value: torch.Tensor) -> None:
    if key == "_amax":
        quantizer.amax = None
        quantizer.amax = value
    elif key == "_pre_quant_scale":
        quantizer.pre_quant_scale = value
    elif key == "_global_amax":
        quantizer.global_amax = value
    else:
        quantizer.register_buffer(key, value.detach().clone())


def _atomic_target(path: Path) -> str:
    return str(atomic_temp(path))


def _publish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the permissions a plain ``open(path, "w")`` would (mkstemp makes 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _encode_extra_state(key: str, value: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A JSON description of a non-tensor state_dict entry, and the uint8 tensor holding its bytes if any."""
    if value is None:
        return {"kind": "none"}, None
    if isinstance(value, (bytes, bytearray, io.BytesIO)):
        data = value.getvalue() if isinstance(value, io.BytesIO) else bytes(value)
        kind = "bytesio" if isinstance(value, io.BytesIO) else "bytes"
        if not data:
            return {"kind": kind}, torch.empty(0, dtype=torch.uint8)
        return {"kind": kind}, torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError(
            f"cannot save state_dict entry {key!r}: a {type(value).__name__} is not a tensor, None, bytes "
            "or a JSON value, and quant_core.save never pickles"
        ) from None
    return {"kind": "json", "value": value}, None


def _decode_extra_state(info: dict[str, Any], tensor: torch.Tensor | None) -> Any:
    kind = info.get("kind")
    if kind == "none":
        return None
    if kind == "json":
        return info["value"]
    if kind in ("bytes", "bytesio") and tensor is not None:
        data = tensor.numpy().tobytes()
        return io.BytesIO(data) if kind == "bytesio" else data
    raise ValueError(f"unknown extra state record {info!r}")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Identity of the memory a tensor views (None for empty or meta tensors, which share nothing)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    storage = _storage_key(t)
    return (
        None
        if storage is None
        else (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    )


def _tensors_to_write(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict as safetensors accepts it (one copy of shared memory), and its extra-state records."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    views: set[tuple[Any, ...]] = set()
    storages: set[tuple[Any, ...]] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            extra[key], value = _encode_extra_state(key, value)
            if value is None:
                continue
        view, storage = _view_key(value), _storage_key(value)
        if view is not None and view in views:
            continue  # the same tensor under a second name (tied weights): refilled on restore
        if storage is not None and storage in storages:
            value = value.clone()  # a different view of shared memory: written as its own copy
        if view is not None:
            views.add(view)
            storages.add(storage)
        tensors[key] = value.detach().contiguous()
    return tensors, extra


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s weights, quantizer buffers and quantizer state to one safetensors file, atomically."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: folder {path.parent} does not exist")
    state = quantizer_state(model)
    state.pop("tensors")
    tensors, extra = _tensors_to_write(model)
    metadata = {_METADATA_KEY: json.dumps(state)}
    if extra:
        metadata[_EXTRA_METADATA_KEY] = json.dumps(extra)
    tmp = _atomic_target(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Restore a model written by :func:`save` onto ``model`` (a fresh copy of the original model)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path} as a safetensors file: {err}") from None
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{path} was not written by quant_core.save (no quantizer state in its metadata)"
        )
    quant_state = read_metadata_json(path, metadata[_METADATA_KEY], "quantizer state")
    extra_state = read_metadata_json(path, metadata.get(_EXTRA_METADATA_KEY, "{}"), "extra state")
    _check_state(quant_state)
    check_state_fits(model, quant_state, shapes)
    with _undone_on_error(model):
        _restore_from(model, path, quant_state, extra_state)
    return model


@contextmanager
def _undone_on_error(model: nn.Module) -> Iterator[None]:
    """On an exception, put every module of ``model`` back as it was: class, attributes, children,
    parameters and buffers (no tensor is copied; values loaded in place are not undone)."""
    saved = [
        (m, type(m), set(vars(m)), dict(m._modules), dict(m._parameters), dict(m._buffers))
        for m in model.modules()
    ]
    try:
        yield
    except BaseException:
        for module, cls, keys, children, params, buffers in saved:
            module.__class__ = cls
            for key in set(vars(module)) - keys:
                del module.__dict__[key]
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        raise


def _restore_from(
    model: nn.Module, path: Path | str, quant_state: dict[str, Any], extra_state: dict[str, Any]
) -> None:
    """The part of :func:`restore` that changes the model (undone by the caller on an error)."""
    restore_quantizer_state(model, quant_state)
    state: dict[str, Any] = load_file(str(path))
    for key, info in extra_state.items():
        state[key] = _decode_extra_state(info, state.get(key))
    expected = model.state_dict()
    written = {_view_key(v) for k, v in expected.items() if k in state and torch.is_tensor(v)}
    written.discard(None)
    missing = [
        k
        for k, v in expected.items()
        if k not in state and not (torch.is_tensor(v) and _view_key(v) in written)
    ]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)

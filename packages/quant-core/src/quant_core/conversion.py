"""In-place conversion of modules to their quantized classes, and applying configs to quantizers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from quant_core.config.schema import (
    QuantCfgEntry,
    QuantizerAttributeConfig,
    normalize_quant_cfg,
    parse_attributes,
)
from quant_core.nn.registry import QuantModuleRegistry, class_key
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

Quantizer = TensorQuantizer | SequentialQuantizer


def register(original_cls: type, quantized_cls: type) -> None:
    """Register a user quantized class; it replaces ``original_cls`` in later ``quantize`` calls.

    The user's mapping wins over the library's, also for classes the library already maps.
    """
    QuantModuleRegistry.register_user(original_cls, quantized_cls)


def unregister(original_cls: type) -> None:
    """Remove the user's mapping of ``original_cls`` (the library's own mapping, if any, returns)."""
    QuantModuleRegistry.unregister(original_cls)


def convert_module(module: nn.Module, quantized_cls: type) -> None:
    """Turn ``module`` into ``quantized_cls`` in place (same parameters, buffers and hooks) and set it up."""
    original = type(module)
    module.__class__ = quantized_cls
    module._quant_original_key = QuantModuleRegistry.get_key(original)  # type: ignore[assignment]
    module._setup()


def replace_quant_modules(model: nn.Module) -> list[str]:
    """Convert every registered module of ``model`` in place; returns the names converted."""
    converted = []
    for name, module in list(model.named_modules()):
        if getattr(module, "_quant_original_key", None) is not None:
            continue
        quantized_cls = QuantModuleRegistry.get(type(module))
        if quantized_cls is not None:
            convert_module(module, quantized_cls)
            converted.append(name)
    name_quantizers(model)
    return converted


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer, nn.Module]]:
    """Every top-level quantizer as (full name, quantizer, parent module); stages of a SequentialQuantizer are not listed."""
    for parent_name, parent in model.named_modules():
        if isinstance(parent, SequentialQuantizer):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, (TensorQuantizer, SequentialQuantizer)):
                yield (f"{parent_name}.{child_name}" if parent_name else child_name), child, parent


def iter_tensor_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every TensorQuantizer (stages of sequential quantizers included) with its full name."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def name_quantizers(model: nn.Module) -> None:
    """Give every TensorQuantizer its full name (used in warnings and errors)."""
    for name, quantizer in iter_tensor_quantizers(model):
        quantizer._name = name


def _parent_keys(parent: nn.Module) -> set[str]:
    keys = {class_key(type(parent)), type(parent).__name__}
    original_key = getattr(parent, "_quant_original_key", None)
    if original_key:
        keys |= {original_key, original_key.removeprefix("nn.")}
    return keys


def _set_cfg(parent: nn.Module, attr: str, current: Quantizer, cfg: Any) -> Quantizer:
    if isinstance(cfg, tuple):
        if isinstance(current, SequentialQuantizer) and len(current) == len(cfg):
            current.set_from_attribute_config(list(cfg))
            return current
        new = SequentialQuantizer(*(TensorQuantizer(c) for c in cfg))
    elif isinstance(current, SequentialQuantizer):
        new = TensorQuantizer(cfg)
    else:
        current.set_from_attribute_config(cfg)
        return current
    setattr(parent, attr, new)
    return new


def set_quantizer_by_cfg(model: nn.Module, quant_cfg: Any) -> None:
    """Apply a ``quant_cfg`` (dict or list shape) to the quantizers of ``model``; later entries win."""
    entries: list[QuantCfgEntry] = (
        quant_cfg if _is_entries(quant_cfg) else normalize_quant_cfg(quant_cfg)
    )
    for name, quantizer, parent in list(iter_quantizers(model)):
        keys = _parent_keys(parent)
        cfg: Any = None
        enable: bool | None = None
        for entry in entries:
            if not entry.matches(name, keys):
                continue
            if entry.cfg is not None:
                cfg = entry.cfg
                default = all(c.enable for c in cfg) if isinstance(cfg, tuple) else cfg.enable
                enable = entry.enable if entry.enable is not None else default
            elif entry.enable is not None:
                enable = entry.enable
        if cfg is not None:
            quantizer = _set_cfg(parent, name.rsplit(".", 1)[-1], quantizer, cfg)
        if enable is True:
            quantizer.enable()
        elif enable is False:
            quantizer.disable()
    name_quantizers(model)


def _is_entries(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(e, QuantCfgEntry) for e in value)


def _select(model: nn.Module, wildcard_or_filter: str | Callable[[str], bool]):
    entry = QuantCfgEntry(wildcard_or_filter, None, None, None)
    for name, quantizer, parent in list(iter_quantizers(model)):
        if entry.matches(name, set()):
            yield name, quantizer, parent


def set_quantizer_attribute(
    model: nn.Module,
    wildcard_or_filter: str | Callable[[str], bool],
    attribute: QuantizerAttributeConfig | dict[str, Any] | list[Any],
) -> None:
    """Set attributes on the quantizers whose full name matches; a dict updates only the keys it names."""
    for name, quantizer, parent in _select(model, wildcard_or_filter):
        if isinstance(attribute, list):
            _set_cfg(
                parent,
                name.rsplit(".", 1)[-1],
                quantizer,
                tuple(parse_attributes(a) for a in attribute),
            )
        elif isinstance(quantizer, SequentialQuantizer):
            for stage in quantizer:
                stage.set_from_attribute_config(attribute)
        else:
            quantizer.set_from_attribute_config(attribute)
    name_quantizers(model)


def enable_quantizer(model: nn.Module, wildcard_or_filter: str | Callable[[str], bool]) -> None:
    """Enable the quantizers whose full name matches the wildcard or filter function."""
    for _name, quantizer, _parent in _select(model, wildcard_or_filter):
        quantizer.enable()


def disable_quantizer(model: nn.Module, wildcard_or_filter: str | Callable[[str], bool]) -> None:
    """Disable the quantizers whose full name matches the wildcard or filter function."""
    for _name, quantizer, _parent in _select(model, wildcard_or_filter):
        quantizer.disable()

"""In-place conversion of modules to their quantized classes, and applying configs to quantizers."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from quant_core.config.schema import (
    QuantCfgEntry,
    QuantizerAttributeConfig,
    normalize_quant_cfg,
    normalized_quantizer_name,
    parse_attributes,
)
from quant_core.config.unmatched import check_parent_classes, warn_unmatched
from quant_core.nn.registry import QuantModuleRegistry, check_forward, class_key, convert_module
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


def replace_quant_modules(model: nn.Module) -> list[str]:
    """Convert every registered module of ``model`` in place; returns the names converted."""
    todo = []
    for name, module in list(model.named_modules()):
        if getattr(module, "_quant_original_key", None) is not None:
            continue
        quantized_cls = QuantModuleRegistry.get(type(module))
        if quantized_cls is not None:
            check_forward(module, name)  # before converting anything
            todo.append((name, module, quantized_cls))
    for name, module, quantized_cls in todo:
        convert_module(module, quantized_cls, name)
    converted = [name for name, _m, _c in todo]
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
    check_parent_classes(entries)
    by_name, patterns = _index_entries(entries)
    matched: set[int] = set()
    for name, quantizer, parent in list(iter_quantizers(model)):
        keys = _parent_keys(parent)
        cfg: Any = None
        enable: bool | None = None
        exact = by_name.get(name, ())
        normalized = normalized_quantizer_name(name)
        if normalized != name and normalized in by_name:  # ModelOpt's per-expert names
            exact = sorted({*exact, *by_name[normalized]})
        for i in heapq.merge(patterns, exact):  # in config order
            entry = entries[i]
            if not entry.matches(name, keys):
                continue
            matched.add(i)
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
    warn_unmatched(entries, matched, model)


def _index_entries(entries: list[QuantCfgEntry]) -> tuple[dict[str, list[int]], list[int]]:
    """Entry positions by exact quantizer name, and the positions of wildcard or callable entries.

    A config with one entry per layer (an AutoQuantize replay, a recipe) then costs a lookup per
    quantizer instead of a wildcard match against every entry.
    """
    by_name: dict[str, list[int]] = {}
    patterns: list[int] = []
    for i, entry in enumerate(entries):
        name = entry.quantizer_name
        if isinstance(name, str) and not any(c in name for c in "*?["):
            by_name.setdefault(name, []).append(i)
        else:
            patterns.append(i)
    return by_name, patterns


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


# ----- ModelOpt 0.47's finer-grained setters and context managers ---------------------------------


def replace_quant_module(model: nn.Module, version: Any = None, registry: Any = None) -> None:
    """Convert every registered module of ``model`` to its quantized class (ModelOpt's name; no config applied).

    ``version`` and ``registry`` exist for ModelOpt's signature; only the default registry is used.
    """
    from quant_core.plugins import prepare_model

    if registry not in (None, QuantModuleRegistry):
        raise ValueError("replace_quant_module uses quant_core's QuantModuleRegistry only")
    if any(isinstance(m, (TensorQuantizer, SequentialQuantizer)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized (it holds quantizers)")
    prepare_model(model)
    replace_quant_modules(model)


def _select_in(model: nn.Module, wildcard_or_filter: Any, parent_class: type | None):
    for name, quantizer, parent in _select(model, wildcard_or_filter):
        if parent_class is None or isinstance(parent, parent_class):
            yield name, quantizer, parent


def set_quantizer_attributes_partial(
    quant_model: nn.Module,
    wildcard_or_filter_func: str | Callable[[str], bool],
    partial_attributes: dict[str, Any] | list[dict[str, Any]],
    parent_class: type[nn.Module] | None = None,
) -> None:
    """Merge the attributes named in a dict into the matching quantizers (a dict is broadcast to every stage).

    A list sets each stage of a matching SequentialQuantizer; it never turns a TensorQuantizer into one.
    """
    if not isinstance(partial_attributes, (dict, list)) or (
        isinstance(partial_attributes, list)
        and not all(isinstance(a, dict) for a in partial_attributes)
    ):
        raise ValueError(
            f"partial_attributes must be a dict or a list of dicts, got {partial_attributes!r}"
        )
    for name, quantizer, _parent in _select_in(quant_model, wildcard_or_filter_func, parent_class):
        if isinstance(partial_attributes, list) and not isinstance(quantizer, SequentialQuantizer):
            raise ValueError(
                f"a list of attributes needs a SequentialQuantizer, but {name} is a TensorQuantizer"
            )
        quantizer.set_from_attribute_config(partial_attributes)
    name_quantizers(quant_model)


def set_quantizer_attributes_full(
    quant_model: nn.Module,
    wildcard_or_filter_func: str | Callable[[str], bool],
    attributes: QuantizerAttributeConfig | list[QuantizerAttributeConfig],
    parent_class: type[nn.Module] | None = None,
) -> None:
    """Replace all attributes of the matching quantizers (unnamed fields take their defaults).

    A list makes each match a SequentialQuantizer with one stage per config.
    """
    items = attributes if isinstance(attributes, list) else [attributes]
    if not items or not all(isinstance(a, QuantizerAttributeConfig) for a in items):
        raise ValueError(
            "attributes must be a QuantizerAttributeConfig or a non-empty list of them, "
            f"got {attributes!r}"
        )
    cfg = tuple(items) if isinstance(attributes, list) else attributes
    for name, quantizer, parent in _select_in(quant_model, wildcard_or_filter_func, parent_class):
        _set_cfg(parent, name.rsplit(".", 1)[-1], quantizer, cfg)
    name_quantizers(quant_model)


def _snapshot(q: TensorQuantizer) -> tuple[Any, ...]:
    amax = q.amax.detach().clone() if q.amax is not None else None
    return q.attribute_config, amax, q._if_quant, q._if_calib


def _restore(q: TensorQuantizer, saved: tuple[Any, ...]) -> None:
    attrs, amax, if_quant, if_calib = saved
    q.set_from_attribute_config(attrs)
    if q.amax is None and amax is not None:
        q.amax = amax  # dropped by a format change inside the context
    q._if_quant, q._if_calib = if_quant, if_calib


@contextmanager
def preserve_quantizer_attributes_context(quant_model: nn.Module) -> Iterator[None]:
    """Restore every quantizer's attributes (and TensorQuantizer / SequentialQuantizer type) on exit.

    An amax calibrated inside the context is kept; one dropped by a format change comes back.
    """
    saved = {}
    for name, quantizer, _parent in iter_quantizers(quant_model):
        stages = list(quantizer) if isinstance(quantizer, SequentialQuantizer) else [quantizer]
        saved[name] = (isinstance(quantizer, SequentialQuantizer), [_snapshot(q) for q in stages])
    try:
        yield
    finally:
        for name, quantizer, parent in list(iter_quantizers(quant_model)):
            if name not in saved:
                continue
            sequential, stages = saved[name]
            if sequential != isinstance(quantizer, SequentialQuantizer) or (
                sequential and len(quantizer) != len(stages)
            ):
                fresh = [TensorQuantizer(s[0]) for s in stages]
                quantizer = SequentialQuantizer(*fresh) if sequential else fresh[0]
                setattr(parent, name.rsplit(".", 1)[-1], quantizer)
            for q, state in zip(quantizer if sequential else [quantizer], stages):
                _restore(q, state)
        name_quantizers(quant_model)


@contextmanager
def set_quantizer_by_cfg_context(quant_model: nn.Module, quant_cfg: Any) -> Iterator[None]:
    """Apply ``quant_cfg`` for the duration of the block, then restore every quantizer's attributes.

    Multi-stage (list) ``cfg`` entries are refused, as in ModelOpt.
    """
    entries = normalize_quant_cfg(quant_cfg)
    if any(isinstance(e.cfg, tuple) for e in entries):
        raise ValueError(
            "set_quantizer_by_cfg_context takes single-config entries only (no attribute lists)"
        )
    with preserve_quantizer_attributes_context(quant_model):
        set_quantizer_by_cfg(quant_model, entries)
        yield

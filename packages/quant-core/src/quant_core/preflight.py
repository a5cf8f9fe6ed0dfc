"""Checks that run before ``quantize`` / ``calibrate`` change anything in the model.

Validate first, then mutate: an unknown algorithm, an option the algorithm does not take or one
outside its allowed range, and a model whose tensors are on the ``meta`` device are refused
here, naming the input and what is allowed, while the model is still untouched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import nn

from quant_core.algorithms import get_algorithm
from quant_core.algorithms.registry import Algorithm
from quant_core.config.algorithm_configs import QuantizeAlgorithmConfig, algorithm_spec
from quant_core.diagnostics import name_list
from quant_core.layerwise import LayerwiseOptions, split_layerwise

__all__ = [
    "AlgorithmRun",
    "algorithm_specs",
    "check_algorithms",
    "check_kv_cache_reached",
    "check_materialized",
    "check_not_compressed",
    "check_ranks_agree",
    "model_fingerprint",
]


@dataclass(frozen=True)
class AlgorithmRun:
    """One algorithm of an ``algorithm`` spec, parsed and checked once (`check_algorithms`): its
    name, registered function, its own options and the ``layerwise`` option taken out of them."""

    method: str
    fn: Algorithm
    options: dict[str, Any]
    layerwise: LayerwiseOptions


def algorithm_specs(algorithm: Any) -> list[tuple[str, dict[str, Any]]]:
    """``algorithm`` (a name, ``{"method": name, **options}``, a config object, None or a list) as (name, options) pairs."""
    specs = algorithm if isinstance(algorithm, list) else [algorithm]
    out = []
    for spec in map(algorithm_spec, specs):
        if spec is None:
            continue
        if isinstance(spec, str):
            out.append((spec, {}))
        elif isinstance(spec, dict) and isinstance(spec.get("method"), str):
            options = {k: v for k, v in spec.items() if k != "method"}
            out.append((spec["method"], options))
        elif isinstance(spec, dict) and spec.get("method") is None:
            continue
        else:
            raise ValueError(
                f"algorithm must be a name, {{'method': name, ...}}, None or a list of those; got {spec!r}"
            )
    return out


def _config_classes() -> dict[str, type[QuantizeAlgorithmConfig]]:
    """Each algorithm config class by its method name (subclasses included)."""
    out: dict[str, type[QuantizeAlgorithmConfig]] = {}
    todo = list(QuantizeAlgorithmConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        method = cls.model_fields["method"].default
        if isinstance(method, str):
            out[method] = cls
    return out


def _check_ranges(method: str, options: dict[str, Any]) -> None:
    """Validate the options that ``method``'s config class declares (ranges, types)."""
    cls = _config_classes().get(method)
    if cls is None:
        return
    fields = {cls._renames.get(f, f): f for f in cls.model_fields if f != "method"}
    known = {fields[k]: v for k, v in options.items() if k in fields and v is not None}
    try:
        cls.model_validate(known)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = next((k for k, f in fields.items() if f == e["loc"][0]), e["loc"][0])
            problems.append(f"{key}={e['input']!r} is not allowed: {e['msg'].lower()}")
        raise ValueError(f"algorithm {method!r}: " + "; ".join(problems)) from None


def _check_signature(method: str, fn: Any, options: dict[str, Any]) -> None:
    """Refuse options that ``fn(model, forward_loop, **options)`` does not take, naming the ones it does."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in list(params.items())[2:] if p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"algorithm {method!r} does not take option(s) {unknown}; its options are {allowed}"
        )


def check_algorithms(algorithm: Any) -> list[AlgorithmRun]:
    """Resolve every algorithm of ``algorithm`` and check its options; returns what to run, in order."""
    runs = []
    for method, options in algorithm_specs(algorithm):
        fn = get_algorithm(method)  # an unknown name raises, listing the registered ones
        own, layerwise = split_layerwise(method, options)
        _check_signature(method, fn, own)
        _check_ranges(method, options)
        runs.append(AlgorithmRun(method, fn, own, layerwise))
    return runs


def _offloaded(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` or one of its parents carries an accelerate hook (offloaded weights live on meta)."""
    parts = name.split(".") if name else []
    module = model
    for i in range(len(parts) + 1):
        if hasattr(module, "_hf_hook"):
            return True
        if i < len(parts):
            module = getattr(module, parts[i], None)
            if module is None:
                return False
    return False


def check_materialized(model: nn.Module) -> None:
    """Refuse a model with parameters or buffers on the ``meta`` device (no values to calibrate or quantize).

    Weights offloaded by accelerate (its hooks load them at forward time) are accepted.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta":
            continue
        owner = name.rpartition(".")[0]
        if _offloaded(model, owner):
            continue
        raise ValueError(
            f"{type(model).__name__}.{name} is on the meta device (a shape without values), so it "
            "cannot be quantized or calibrated. Materialize the model first: "
            "model.to_empty(device='cpu') then model.load_state_dict(weights), or load it "
            "without device='meta' / init_empty_weights."
        )


def check_not_compressed(model: nn.Module, entry: str) -> None:
    """Refuse ``entry`` (``"quantize"`` / ``"calibrate"``) on a model holding compressed layers.

    ``mtq.compress`` replaced those layers' float weights by packed codes: there is nothing left to
    calibrate, and a new config would silently apply to the remaining float layers only.
    """
    from quant_core.compress.module import CompressedLinear

    names = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    if names:
        shown = name_list(names, 3)
        raise ValueError(
            f"mtq.{entry}: {type(model).__name__} holds compressed layers ({shown}), whose weights "
            f"are packed codes; {entry} the fake-quant model before mtq.compress (or restore it "
            "into a fresh float model)"
        )


def check_kv_cache_reached(model: nn.Module, entries: list[Any]) -> None:
    """Warn when the config quantizes the KV cache (``*_bmm_quantizer`` patterns, as ``with_kv_cache``
    adds) but ``model`` has no attention module with KV-cache quantizers: nothing would be quantized."""
    from quant_core.conversion import iter_quantizers
    from quant_core.diagnostics import warn

    def kv_entry(entry: Any) -> bool:
        name = entry.quantizer_name
        if not isinstance(name, str) or "bmm_quantizer" not in name or entry.cfg is None:
            return False
        cfgs = entry.cfg if isinstance(entry.cfg, tuple) else (entry.cfg,)
        return entry.enable is not False and all(c.enable for c in cfgs)

    wanted = [e.quantizer_name for e in entries if kv_entry(e)]
    if not wanted:
        return
    quantizers = list(iter_quantizers(model))
    if any(name.endswith("bmm_quantizer") for name, _q, _p in quantizers):
        return
    if not any(q.is_enabled for _n, q, _p in quantizers):
        return  # a KV-only config: quantize already warns that it enabled nothing
    warn(
        f"the config quantizes the KV cache ({', '.join(map(repr, wanted))}, e.g. from "
        f"with_kv_cache) but {type(model).__name__} has no attention module with KV-cache "
        "quantizers, so no KV cache is quantized: drop with_kv_cache for this model, or register "
        "its attention class (quant_llm registers the Hugging Face ones)",
        stacklevel=3,
    )


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON data in one order: mappings as sorted (key, value) pairs (keys may
    mix ints and strings, as block sizes do), config objects by their fields, a callable pattern by
    its name (the same on every rank)."""
    from collections.abc import Mapping

    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return sorted([str(k), _canonical(v)] for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(map(repr, value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", type(value).__name__)


def model_fingerprint(model: nn.Module, config: Any = None) -> str:
    """A hash of ``model``'s structure (parameter and buffer names, shapes, dtypes), its quantizers'
    attributes and ``config``: equal on ranks that calibrate the same thing."""
    import hashlib
    import json

    from quant_core.conversion import iter_tensor_quantizers

    digest = hashlib.sha1(usedforsecurity=False)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
    for name, quantizer in iter_tensor_quantizers(model):
        attributes = json.dumps(_canonical(quantizer.attribute_config.to_json_dict()))
        digest.update(f"{name}:{quantizer.is_enabled}:{attributes}\n".encode())
    digest.update(json.dumps(_canonical(config)).encode())
    return digest.hexdigest()


def check_ranks_agree(model: nn.Module, config: Any, entry: str) -> None:
    """In data-parallel calibration, refuse (on every rank) when the ranks hold different models,
    quantizer settings or configs: their statistics would be reduced into a wrong union.

    Does nothing without an initialized process group of more than one rank.
    """
    from quant_core.distributed import is_distributed

    if not is_distributed():
        return
    import torch.distributed as dist

    mine = model_fingerprint(model, config)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, value in enumerate(every):
            groups.setdefault(value, []).append(rank)
        parts = "; ".join(f"ranks {ranks}" for ranks in groups.values())
        raise ValueError(
            f"mtq.{entry}: the data-parallel ranks hold different models, quantizer settings or "
            f"configs ({parts} agree among themselves); every rank must call {entry} with the same "
            "model and config, only the calibration data may differ"
        )

"""ModelOpt 0.47's config functions: list normalization, entry lookup, KV-cache merge, YAML loading.

``quant_cfg`` in either shape becomes a list of plain entry dicts
``{"quantizer_name", "parent_class", "cfg", "enable"}`` (validated by the schema); ``load_config``
reads YAML with a safe loader only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from quant_core.config.schema import (
    QuantizeConfig,
    QuantizerCfgEntry,
    normalize_quant_cfg,
    validate_config,
)


def _legacy_entries(key: Any, value: Any) -> list[dict[str, Any]]:
    """One ``{pattern: attributes}`` pair (``"nn.Class": {pattern: attributes}`` too) as entry dicts."""
    if key == "default":
        key = "*"
    if isinstance(key, str) and key.startswith("nn.") and isinstance(value, Mapping):
        return [
            {**_legacy_entries(sub, attrs)[0], "parent_class": key} for sub, attrs in value.items()
        ]
    if isinstance(value, Mapping):
        cfg = {k: v for k, v in value.items() if k != "enable"}
        entry: dict[str, Any] = (
            {"quantizer_name": key, "cfg": cfg} if cfg else {"quantizer_name": key}
        )
        if "enable" in value:
            entry["enable"] = value["enable"]
        return [entry]
    return [{"quantizer_name": key, "cfg": value}]


def entry_dicts(quant_cfg: Any) -> list[dict[str, Any]]:
    """Either ``quant_cfg`` shape as a list of raw entry dicts, in application order (not validated)."""
    if isinstance(quant_cfg, Mapping):
        items = sorted(
            quant_cfg.items(), key=lambda kv: kv[0] != "default"
        )  # default applies first
        return [e for k, v in items for e in _legacy_entries(k, v)]
    if not isinstance(quant_cfg, (list, tuple)):
        raise ValueError(
            f"quant_cfg must be a list of entries or a dict, got {type(quant_cfg).__name__}: {quant_cfg!r}"
        )
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(quant_cfg):
        if isinstance(raw, BaseModel):
            raw = raw.model_dump(exclude_unset=True)
        if not isinstance(raw, Mapping):
            raise ValueError(f"quant_cfg[{i}] must be a dict, got {raw!r}")
        if not raw:
            raise ValueError(
                f"quant_cfg[{i}] is empty: give 'quantizer_name' and 'cfg' or 'enable'"
            )
        if "quantizer_name" in raw:
            out.append(dict(raw))
        else:
            out.extend(e for k, v in raw.items() for e in _legacy_entries(k, v))
    return out


def normalize_quant_cfg_list(v: Any) -> list[QuantizerCfgEntry]:
    """Validate ``quant_cfg`` (either shape) and return its entries as typed :class:`QuantizerCfgEntry`.

    Each entry reads like ModelOpt's (``entry["cfg"]``, ``entry.model_dump()``): ``cfg`` is a
    :class:`QuantizerAttributeConfig` (a list of them for sequential quantizers) or None, and
    ``enable`` defaults to True. An empty ``cfg`` normalizes to None when the entry disables and
    is refused when it enables.
    """
    entries = entry_dicts(v)
    normalize_quant_cfg(entries)  # validates, naming the bad entry by its index
    return [QuantizerCfgEntry(**e) for e in entries]


def find_quant_cfg_entry_by_path(quant_cfg_list: list[Any], quantizer_name: str) -> Any:
    """The last entry whose ``quantizer_name`` equals ``quantizer_name`` exactly (no wildcard matching).

    Entries may be dicts or :class:`QuantizerCfgEntry`; the entry itself is returned.
    """
    found = [e for e in quant_cfg_list if e.get("quantizer_name") == quantizer_name]
    if not found:
        raise KeyError(f"No quant_cfg entry with quantizer_name={quantizer_name!r}")
    return found[-1]


def match_bare_quantizer_cfg(quant_cfg_list: list[Any], quantizer_attr: str) -> tuple[Any, Any]:
    """``(cfg, enable)`` of the last entry that applies to a quantizer attribute name alone.

    ``quantizer_attr`` is a bare attribute name such as ``"weight_quantizer"`` (no module path),
    as AutoQuantize looks formats up. An entry applies when its ``quantizer_name`` wildcard
    matches the bare name (``"*weight_quantizer"``, ``"*"``, ``"*[kv]_bmm_quantizer"``) or ends
    with it (a path-scoped ``"*mlp*weight_quantizer"``); entries scoped by ``parent_class`` are
    skipped. Later entries win, as in ``quantize``. ``(None, None)`` when nothing applies; an
    enable-only entry gives ``cfg`` None. Entries may be dicts or :class:`QuantizerCfgEntry`.
    """
    cfg: Any = None
    enable: Any = None
    for entry in quant_cfg_list:
        if entry.get("parent_class") is not None:
            continue
        pattern = entry["quantizer_name"]
        if callable(pattern):
            applies = bool(pattern(quantizer_attr))
        else:
            applies = fnmatchcase(quantizer_attr, pattern) or pattern.endswith(quantizer_attr)
        if applies:
            cfg, enable = entry.get("cfg"), entry.get("enable", True)
    return cfg, enable


def update_quant_cfg_with_kv_cache_quant(
    quant_cfg: dict[str, Any], kv_cache_quant_cfg: Any
) -> dict[str, Any]:
    """A deep copy of config ``quant_cfg`` with the KV-cache entries appended (algorithm "max" if unset).

    As in ModelOpt 0.47: ``kv_cache_quant_cfg`` is typically ``FP8_KV_CFG["quant_cfg"]`` (its KV
    entries only); a config whose ``quant_cfg`` is None or empty becomes "everything off, then the
    KV entries".
    """
    out = copy.deepcopy(dict(quant_cfg))
    base = entry_dicts(out.get("quant_cfg") or [{"quantizer_name": "*", "enable": False}])
    out["quant_cfg"] = base + entry_dicts(kv_cache_quant_cfg)
    if not out.get("algorithm"):
        out["algorithm"] = "max"
    return out


def need_calibration(config: QuantizeConfig | Mapping[str, Any]) -> bool:
    """True when ``config`` has an algorithm other than max, or a static non-weight quantizer enabled."""
    config = validate_config(config)
    algorithm = config.algorithm
    if isinstance(algorithm, Mapping):
        algorithm = algorithm.get("method")
    if algorithm is not None and algorithm != "max":
        return True
    for entry in entry_dicts(config.quant_cfg):
        name = entry["quantizer_name"]
        if isinstance(name, str) and "weight_quantizer" in name:
            continue  # weights are calibrated without data
        cfgs = entry.get("cfg") or {}
        for cfg in cfgs if isinstance(cfgs, (list, tuple)) else [cfgs]:
            if entry.get("enable", cfg.get("enable", True)) and cfg.get("type") != "dynamic":
                return True
    return False


_EXMY = re.compile(r"^[Ee](\d+)[Mm](\d+)$")


def _exmy(obj: Any) -> Any:
    """``"E4M3"``-style strings under ``num_bits`` / ``scale_bits`` as (exponent, mantissa) tuples."""
    if isinstance(obj, dict):
        return {
            k: (
                tuple(int(g) for g in _EXMY.match(v).groups())
                if k in ("num_bits", "scale_bits") and isinstance(v, str) and _EXMY.match(v)
                else _exmy(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_exmy(v) for v in obj]
    return obj


def load_config(config_path: str | Path, *, schema_type: Any | None = None) -> Any:
    """Read a YAML config (``.yml``/``.yaml`` added when missing) with a safe loader.

    ``"E4M3"``-style ``num_bits``/``scale_bits`` become tuples. With ``schema_type`` (a pydantic
    model such as ``QuantizeConfig``) the data is validated into it; ``QuantizeConfig`` gives a
    validated plain dict usable by ``quantize``.
    """
    path = Path(config_path)
    candidates = (
        [path]
        if path.suffix in (".yml", ".yaml")
        else [
            path.with_name(path.name + ".yml"),
            path.with_name(path.name + ".yaml"),
        ]
    )
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no config file at {[str(p) for p in candidates]}")
    data = _exmy(yaml.safe_load(found.read_text()))
    if isinstance(data, dict) and ("imports" in data or "$import" in data):
        raise ValueError(f"{found}: ModelOpt's 'imports' / '$import' directives are not supported")
    if schema_type is QuantizeConfig:
        validate_config(data)
        return data
    if isinstance(schema_type, type) and issubclass(schema_type, BaseModel):
        return schema_type.model_validate(data)
    if schema_type is not None:
        raise ValueError(f"schema_type must be a pydantic model class, got {schema_type!r}")
    return data


__all__ = [
    "entry_dicts",
    "find_quant_cfg_entry_by_path",
    "load_config",
    "need_calibration",
    "normalize_quant_cfg_list",
    "update_quant_cfg_with_kv_cache_quant",
]

"""The config schema: validated quantizer attributes and the two accepted shapes of ``quant_cfg``.

A config is ``{"quant_cfg": ..., "algorithm": ...}``. ``quant_cfg`` is either a dict
``{pattern: attributes}`` (ModelOpt's classic shape; ``"default"`` means ``"*"`` and
``"nn.Class": {pattern: attributes}`` scopes patterns to a parent class) or ModelOpt's newer
ordered list of ``{"quantizer_name", "parent_class", "cfg", "enable"}`` entries. Both normalize
to a list of :class:`QuantCfgEntry`; later entries win.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from quant_core.config.mapping_access import MappingAccess
from quant_kernels.formats import FP_ELEMENT_NAMES, INT_BITS, QuantFormat, check_block_sizes

FP_FORMATS = FP_ELEMENT_NAMES  # the supported (exponent, mantissa) pairs, from the format table


CALIBRATOR_NAMES = ("max", "histogram", "percentile", "mse", "entropy")


class RotateConfig(BaseModel):
    """ModelOpt's ``rotate``: a normalized Hadamard transform of the last axis before quantization."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = False
    mode: Literal["rotate", "rotate_back"] = "rotate"
    rotate_fp32: bool = False
    block_size: int | None = None

    @field_validator("block_size", mode="before")
    @classmethod
    def _block_size(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"rotate block_size must be a positive int or None, got {v!r}")
        if v is not None and v & (v - 1):
            raise ValueError(f"rotate block_size must be a power of 2, got {v}")
        return v


def _constructor(v: Any) -> tuple[Any, tuple, dict]:
    """ModelOpt's constructor-like ``cls`` / ``(cls,)`` / ``(cls, args)`` / ``(cls, args, kwargs)``."""
    parts = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(parts) <= 3 or not callable(parts[0]):
        raise ValueError(
            f"calibrator must be one of {CALIBRATOR_NAMES} or (cls, args, kwargs), got {v!r}"
        )
    cls, args, kwargs = (
        parts[0],
        parts[1] if len(parts) > 1 else (),
        parts[2] if len(parts) > 2 else {},
    )
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, Mapping):
        raise ValueError(f"calibrator (cls, args, kwargs) needs a tuple and a dict, got {v!r}")
    return cls, tuple(args), dict(kwargs)


class QuantizerAttributeConfig(MappingAccess, BaseModel):
    """Attributes of one TensorQuantizer (ModelOpt names); unknown keys are rejected by name.

    Reads like a dict too, as ModelOpt's does: ``cfg["num_bits"]``, ``cfg.get("axis")``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    enable: bool = True
    num_bits: int | tuple[int, int] | str = 8
    axis: int | tuple[int, ...] | None = None
    fake_quant: bool = True
    unsigned: bool = False
    narrow_range: bool = False
    learn_amax: bool = False
    type: Literal["static", "dynamic"] = "static"
    block_sizes: dict[int | str, Any] | None = None
    bias: dict[int | str, Any] | None = None
    calibrator: Any = "max"
    trt_high_precision_dtype: Literal["Float", "Half", "BFloat16"] = "Float"
    rotate: bool | RotateConfig = False
    backend: str | None = None
    backend_extra_args: dict[str, Any] | None = None
    use_constant_amax: bool = False
    constant_amax: float | None = None
    pass_through_bwd: bool = True
    effective_bits: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_enable_alone(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and dict(values) == {"enable": True}:
            raise ValueError(
                "{'enable': True} alone is not a quantizer config (as in ModelOpt): give the format "
                "too, or use an entry {'quantizer_name': ..., 'enable': True} to re-enable"
            )
        return values

    @field_validator("num_bits", mode="before")
    @classmethod
    def _num_bits(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"num_bits must be an int or an (exponent, mantissa) pair, got {v!r}")
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, int) and v not in INT_BITS:
            raise ValueError(
                f"integer num_bits must be in {INT_BITS.start}..{INT_BITS.stop - 1}, got {v}"
            )
        if isinstance(v, tuple) and tuple(v) not in FP_FORMATS:
            raise ValueError(
                f"num_bits {v!r} is not a supported floating-point format; "
                f"supported (exponent, mantissa) pairs: {sorted(FP_FORMATS)}"
            )
        return v

    @field_validator("calibrator", mode="before")
    @classmethod
    def _calibrator(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in CALIBRATOR_NAMES:
                raise ValueError(f"calibrator must be one of {CALIBRATOR_NAMES}, got {v!r}")
            return v
        return _constructor(v)

    @field_validator("constant_amax")
    @classmethod
    def _constant_amax(cls, v: float | None) -> float | None:
        import math

        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"constant_amax must be a positive value (and finite), got {v!r}")
        return v

    @field_validator("effective_bits")
    @classmethod
    def _effective_bits(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 16:
            raise ValueError(f"effective_bits must be in (0, 16], got {v!r}")
        return v

    @field_serializer("calibrator", when_used="json")
    def _calibrator_json(self, v: Any) -> str:
        # A calibrator class is code: checkpoints store no code, so a restored quantizer gets "max".
        return v if isinstance(v, str) else "max"

    @field_validator("axis", mode="before")
    @classmethod
    def _axis(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("block_sizes", mode="before")
    @classmethod
    def _block_sizes(cls, v: Any) -> Any:
        if v is None:
            return None
        out = check_block_sizes(v)  # the one validator of the dict's keys and values
        # what a config may not combine (the kernels take either)
        if out.get("four_over_six") and out.get("type") == "dynamic":
            raise ValueError(
                "block_sizes['four_over_six'] needs a static (calibrated) NVFP4 quantizer, got "
                f"type 'dynamic' in {v!r} (ModelOpt's fake quantization ignores it there)"
            )
        if out.get("type") == "dynamic" and sum(isinstance(k, int) for k in out) != 1:
            raise ValueError(
                f"dynamic block quantization takes exactly one axis, got block_sizes={v!r}"
            )
        return out

    @field_validator("bias", mode="before")
    @classmethod
    def _bias(cls, v: Any) -> Any:
        if v is None:
            return None
        out: dict[int | str, Any] = {}
        for key, val in dict(v).items():
            if isinstance(key, str) and key.lstrip("-").isdigit():
                key = int(key)
            if isinstance(key, int):
                out[key] = None
            elif (key == "type" and val in ("static", "dynamic")) or (
                key == "method" and val in ("mean", "max_min")
            ):
                out[key] = val
            else:
                raise ValueError(
                    f"bad bias entry {key!r}: {val!r} (int axes, type static/dynamic, method mean/max_min)"
                )
        if not any(isinstance(k, int) for k in out):
            raise ValueError(f"bias {v!r} names no axis to reduce over")
        return out

    @field_validator("fake_quant")
    @classmethod
    def _fake_quant(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "fake_quant=False (real low-precision storage) is not done by quant-core; "
                "quant-export writes real quantized weights"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QuantizerAttributeConfig:
        if isinstance(self.num_bits, str) and self.backend is None:
            raise ValueError(
                f"num_bits={self.num_bits!r}: a string num_bits names a custom backend's format "
                "and needs backend=<name registered with nn.register_quant_backend>"
            )
        if self.use_constant_amax and self.constant_amax is not None:
            raise ValueError("use_constant_amax and constant_amax are mutually exclusive; set one")
        if self.block_sizes is not None and self.axis is not None:
            raise ValueError(
                f"axis={self.axis!r} cannot be combined with block_sizes={self.block_sizes!r}"
            )
        if self.learn_amax and (self.is_dynamic or self.block_sizes is not None):
            raise ValueError(
                "learn_amax needs a static per-tensor or per-channel amax (no dynamic or block quantization)"
            )
        named = isinstance(self.calibrator, str)
        if (
            named
            and self.calibrator != "max"
            and (self.axis is not None or self.block_sizes is not None)
        ):
            raise ValueError(
                f"calibrator {self.calibrator!r} is per-tensor only; got axis/block_sizes"
            )
        return self

    @property
    def is_dynamic(self) -> bool:
        """True when amax is computed from each input instead of calibrated."""
        return self.type == "dynamic" or (self.block_sizes or {}).get("type") == "dynamic"

    @property
    def rotate_config(self) -> RotateConfig:
        """``rotate`` as a `RotateConfig` (``True`` means ``RotateConfig(enable=True)``)."""
        return (
            self.rotate
            if isinstance(self.rotate, RotateConfig)
            else RotateConfig(enable=self.rotate)
        )

    def quant_format(self) -> QuantFormat:
        """The format these attributes describe, parsed into quant-kernels' `QuantFormat`.

        A custom backend's string ``num_bits`` has no table row: its granularity is parsed with
        8-bit integer elements (what calibrators read); the backend computes the values.
        """
        num_bits = 8 if isinstance(self.num_bits, str) else self.num_bits
        return QuantFormat.parse(
            num_bits, self.axis, self.block_sizes, self.type, self.unsigned, self.narrow_range
        )

    def to_json_dict(self) -> dict[str, Any]:
        """All attributes as JSON-safe values (tuples become lists, int keys become strings)."""
        return self.model_dump(mode="json")


def parse_attributes(attrs: Any, where: str = "") -> QuantizerAttributeConfig:
    """Validate an attribute dict (or config) and name the pattern in the error."""
    if isinstance(attrs, QuantizerAttributeConfig):
        return attrs
    if not isinstance(attrs, Mapping):
        raise ValueError(
            f"quantizer attributes ('cfg'){where} must be a valid dictionary of attributes (a list "
            f"of them for a sequential quantizer), got {type(attrs).__name__}: {attrs!r}"
        )
    try:
        return QuantizerAttributeConfig(**attrs)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(attributes)"
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(QuantizerAttributeConfig.model_fields)
                problems.append(
                    f"unknown key {loc!r} (value {e['input']!r}); allowed keys: {allowed}"
                )
            else:
                problems.append(f"{loc}={e.get('input')!r}: {e['msg']}")
        raise ValueError(f"invalid quantizer attributes{where}: " + "; ".join(problems)) from None


_PER_EXPERT_QUANTIZER = re.compile(r"(weight_quantizer|input_quantizer)s?\.\d+(?=$|\.)")


@functools.lru_cache(maxsize=65536)  # matched against every config entry of every quantizer
def normalized_quantizer_name(name: str) -> str:
    """``name`` with per-expert list indices dropped, as ModelOpt 0.47 matches them:
    ``...gate_up_proj_weight_quantizers.3`` -> ``...gate_up_proj_weight_quantizer`` (also for
    ``input_quantizer[s].N``), so ``*weight_quantizer`` and ``*gate_up_proj_weight_quantizer``
    select every expert's quantizer, as they do on ModelOpt."""
    return _PER_EXPERT_QUANTIZER.sub(r"\1", name)


@dataclass(frozen=True)
class QuantCfgEntry:
    """One normalized ``quant_cfg`` instruction: which quantizers, and what to set on them."""

    quantizer_name: str | Callable[[str], bool]
    parent_class: str | None = None
    cfg: QuantizerAttributeConfig | tuple[QuantizerAttributeConfig, ...] | None = None
    enable: bool | None = None

    def matches(self, name: str, parent_keys: set[str]) -> bool:
        """True when the quantizer ``name`` (with parent class keys) is selected by this entry."""
        from fnmatch import fnmatchcase

        if self.parent_class is not None and self.parent_class not in parent_keys:
            return False
        if callable(self.quantizer_name):
            return bool(self.quantizer_name(name))
        if fnmatchcase(name, self.quantizer_name):
            return True
        normalized = normalized_quantizer_name(name)
        return normalized != name and fnmatchcase(normalized, self.quantizer_name)


_ENTRY_KEYS = {"quantizer_name", "parent_class", "cfg", "enable"}


def _is_empty_cfg(cfg: Any) -> bool:
    """``{}``, ``[]`` or a list of ``{}``: a ``cfg`` that names no attribute."""
    if isinstance(cfg, Mapping):
        return len(cfg) == 0
    if isinstance(cfg, (list, tuple)):
        return all(isinstance(c, Mapping) and len(c) == 0 for c in cfg)
    return False


def _empty_cfg_rule(raw: Mapping[str, Any], where: str) -> Any:
    """ModelOpt 0.47's rule for an empty ``cfg``: None when the entry disables, an error otherwise.

    Applied as a full attribute replacement, an empty ``cfg`` would reset the quantizer to the
    schema defaults (and an enabling one would quantize with them, a likely typo).
    """
    cfg = raw.get("cfg")
    if cfg is None or not _is_empty_cfg(cfg):
        return cfg
    if raw.get("enable") is False:
        return None
    raise ValueError(
        f"{where} ({raw.get('quantizer_name')!r}) has an empty 'cfg' {cfg!r} and enables the "
        "quantizer: give at least one quantizer attribute; to keep the existing attributes drop 'cfg' and "
        "set 'enable': True, to disable set 'enable': False"
    )


class QuantizerCfgEntry(MappingAccess, BaseModel):
    """One ``quant_cfg`` entry, typed (ModelOpt 0.47's ``QuantizerCfgEntry``).

    ``cfg`` is a :class:`QuantizerAttributeConfig` (or a list of them for a sequential quantizer)
    or None (keep the quantizer's attributes); ``enable`` defaults to True. An entry must set
    ``cfg`` or ``enable``; an empty ``cfg`` becomes None when ``enable`` is False and is refused
    otherwise. Reads like a dict too (``entry["quantizer_name"]``); ``model_dump()`` gives one.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    quantizer_name: str | Callable[[str], bool]
    parent_class: str | None = None
    cfg: QuantizerAttributeConfig | list[QuantizerAttributeConfig] | None = None
    enable: bool = True

    @model_validator(mode="before")
    @classmethod
    def _empty_cfg(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and "cfg" in values:
            cfg = _empty_cfg_rule(values, "quant_cfg entry")
            if cfg is not values["cfg"]:
                values = {**values, "cfg": cfg}
        return values

    @field_validator("cfg", mode="before")
    @classmethod
    def _parse_cfg(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        where = f" for quantizer_name {info.data.get('quantizer_name')!r}"
        if isinstance(v, (list, tuple)):
            return [parse_attributes(c, where) for c in v]
        return parse_attributes(v, where)

    @field_validator("enable", mode="before")
    @classmethod
    def _enable_is_bool(cls, v: Any) -> Any:
        if not isinstance(v, bool):
            raise ValueError(f"'enable' must be True or False, got {v!r}")
        return v

    @model_validator(mode="after")
    def _an_instruction(self) -> QuantizerCfgEntry:
        if not {"cfg", "enable"} & self.model_fields_set:
            raise ValueError(
                f"quant_cfg entry {self.quantizer_name!r} must specify 'cfg', 'enable' or both: it "
                "sets neither 'cfg' nor 'enable', so it "
                "would change nothing (write 'enable': True explicitly to re-enable)"
            )
        return self


def _entry(name: Any, value: Any, parent_class: str | None = None) -> QuantCfgEntry:
    where = f" for pattern {name!r}"
    if name == "default":
        name = "*"
    if not (isinstance(name, str) or callable(name)):
        raise ValueError(f"quant_cfg pattern must be a wildcard string or a callable, got {name!r}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"empty attribute list{where}")
        cfgs = tuple(parse_attributes(v, where) for v in value)
        return QuantCfgEntry(name, parent_class, cfgs, None)
    if not isinstance(value, Mapping):
        raise ValueError(f"quant_cfg value{where} must be a dict or a list of dicts, got {value!r}")
    value = dict(value)
    enable = value.pop("enable", None)
    if enable is not None and not isinstance(enable, bool):
        raise ValueError(f"'enable'{where} must be True or False, got {enable!r}")
    cfg = (
        parse_attributes({**value, "enable": enable if enable is not None else True}, where)
        if value
        else None
    )
    return QuantCfgEntry(name, parent_class, cfg, enable)


def normalize_quant_cfg(quant_cfg: Any) -> list[QuantCfgEntry]:
    """Turn either accepted ``quant_cfg`` shape into an ordered list of validated entries."""
    entries: list[QuantCfgEntry] = []
    if isinstance(quant_cfg, Mapping):
        # "default" is the fallback for every quantizer, so it applies first wherever it is written.
        items = sorted(quant_cfg.items(), key=lambda kv: kv[0] != "default")
        for key, value in items:
            if (
                isinstance(key, str)
                and key.startswith("nn.")
                and isinstance(value, Mapping)
                and all(isinstance(v, Mapping) for v in value.values())
                and not (set(value) & set(QuantizerAttributeConfig.model_fields))
            ):
                entries += [_entry(sub, attrs, parent_class=key) for sub, attrs in value.items()]
            else:
                entries.append(_entry(key, value))
        return entries
    if isinstance(quant_cfg, (list, tuple)):
        for i, raw in enumerate(quant_cfg):
            if isinstance(raw, QuantizerCfgEntry):  # a typed entry: what its user set
                raw = raw.model_dump(exclude_unset=True)
            if not isinstance(raw, Mapping):
                raise ValueError(f"quant_cfg[{i}] must be a dict, got {raw!r}")
            if "quantizer_name" not in raw:
                if len(raw) == 1:  # legacy single-pattern entry
                    entries.extend(normalize_quant_cfg(dict(raw)))
                    continue
                raise ValueError(f"quant_cfg[{i}] needs 'quantizer_name': {dict(raw)!r}")
            unknown = set(raw) - _ENTRY_KEYS
            if unknown:
                raise ValueError(
                    f"quant_cfg[{i}] has unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
                )
            if "cfg" not in raw and "enable" not in raw:
                raise ValueError(
                    f"quant_cfg[{i}] ({raw['quantizer_name']!r}) must specify 'cfg', 'enable' or "
                    "both: it sets neither 'cfg' nor 'enable'"
                )
            where = f" in quant_cfg[{i}] ({raw['quantizer_name']!r})"
            enable = raw.get("enable")
            if enable is not None and not isinstance(enable, bool):
                raise ValueError(f"'enable'{where} must be True or False, got {enable!r}")
            cfg = _empty_cfg_rule(raw, f"quant_cfg[{i}]")
            if isinstance(cfg, (list, tuple)):
                cfg = tuple(parse_attributes(c, where) for c in cfg) or None
            elif cfg:
                cfg = parse_attributes(cfg, where)
            else:
                cfg = None
            entries.append(
                QuantCfgEntry(raw["quantizer_name"], raw.get("parent_class"), cfg, enable)
            )
        return entries
    raise ValueError(
        f"quant_cfg must be a dict or a list of entries, got {type(quant_cfg).__name__}: {quant_cfg!r}"
    )


AlgorithmSpec = str | dict[str, Any] | None | list[Any]


class QuantizeConfig(BaseModel):
    """A whole config: ``quant_cfg`` (either shape) and the calibration ``algorithm``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    quant_cfg: Any = {"*": {"num_bits": 8, "axis": None}}
    algorithm: AlgorithmSpec = "max"

    @field_validator("quant_cfg")
    @classmethod
    def _check_quant_cfg(cls, v: Any, info: ValidationInfo) -> Any:
        entries = normalize_quant_cfg(v)
        if isinstance(info.context, dict):  # parse_config keeps them: normalized once
            info.context["entries"] = entries
        return v

    @field_validator("algorithm", mode="before")
    @classmethod
    def _check_algorithm(cls, v: Any) -> Any:
        from quant_core.config.algorithm_configs import algorithm_spec

        v = [algorithm_spec(s) for s in v] if isinstance(v, list) else algorithm_spec(v)
        for spec in v if isinstance(v, list) else [v]:
            if spec is None or isinstance(spec, str):
                continue
            if (
                not isinstance(spec, Mapping)
                or "method" not in spec
                or not isinstance(spec["method"], (str, type(None)))
            ):
                raise ValueError(
                    f"algorithm must be a name or a dict with a 'method' key, got {spec!r}"
                )
        return v

    @property
    def entries(self) -> list[QuantCfgEntry]:
        """The normalized ``quant_cfg`` entries, in order."""
        return normalize_quant_cfg(self.quant_cfg)


def validate_config(config: Any) -> QuantizeConfig:
    """Validate a user config dict (or QuantizeConfig); errors name the offending key and value."""
    return parse_config(config)[0]


def parse_config(config: Any) -> tuple[QuantizeConfig, list[QuantCfgEntry]]:
    """`validate_config` and the normalized ``quant_cfg`` entries, normalizing ``quant_cfg`` once."""
    if isinstance(config, QuantizeConfig):
        return config, config.entries
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config must be a dict with 'quant_cfg' and 'algorithm', got {type(config).__name__}"
        )
    context: dict[str, Any] = {}
    try:
        cfg = QuantizeConfig.model_validate(dict(config), context=context)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown config key {loc!r}; allowed: 'quant_cfg', 'algorithm'")
            else:
                problems.append(f"{loc}: {e['msg']}")
        raise ValueError("invalid quantization config: " + "; ".join(problems)) from None
    if "entries" not in context:  # quant_cfg left at its default is not validated
        context["entries"] = cfg.entries
    return cfg, context["entries"]

"""ModelOpt's per-algorithm config classes (``MaxCalibConfig``, ``SmoothQuantCalibConfig``, ...).

Each is a validated pydantic model usable wherever an ``algorithm`` is accepted (``mtq.calibrate``,
a config's ``"algorithm"``). Only the fields a user sets are passed on to the algorithm, under
quant's option names; a field the algorithm here does not implement is refused by name. Numeric
options carry their allowed ranges (``alpha`` in [0, 1], ...); ``mtq.calibrate`` and
``mtq.quantize`` check a ``{"method": ..., **options}`` dict against them too, before changing the
model (:mod:`quant_core.preflight`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from quant_core.config.mapping_access import MappingAccess


class LayerwiseConfig(MappingAccess, BaseModel):
    """Layer-by-layer calibration options (ModelOpt 0.47's ``LayerwiseConfig``).

    ``enable`` calibrates one decoder layer at a time; ``get_qdq_activations_from_prev_layer``
    feeds each layer the outputs of the already quantized layers before it (default True for
    ``gptq``, False otherwise). ModelOpt's resumable-run fields ``checkpoint_dir``, ``save_every``
    and ``calib_mutates_weights`` are validated as there, but setting any of them is refused by
    name when the algorithm runs: per-layer checkpoints are not provided here.
    """

    model_config = ConfigDict(extra="forbid")

    enable: bool = False
    get_qdq_activations_from_prev_layer: bool = False
    checkpoint_dir: str | None = None
    save_every: int = Field(1, ge=1)
    calib_mutates_weights: bool = True


class QuantizeAlgorithmConfig(MappingAccess, BaseModel):
    """Base of the algorithm configs; ``method=None`` means no calibration."""

    model_config = ConfigDict(extra="forbid")
    _renames: ClassVar[dict[str, str]] = {}
    _mutates_weights: ClassVar[bool] = True
    """Whether the algorithm changes ``weight`` (ModelOpt: max, mse, local_hessian do not)."""

    method: None = None
    layerwise: LayerwiseConfig | Literal["auto"] = Field(default_factory=LayerwiseConfig)
    """Layer-by-layer calibration (see :mod:`quant_core.layerwise`): a :class:`LayerwiseConfig`
    (a dict or True are parsed into one); ``"auto"`` (quant's): layer by layer when the model has a
    decoder stack."""

    @field_validator("layerwise", mode="before")
    @classmethod
    def _coerce_layerwise(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, bool):
            return {"enable": v}
        if isinstance(v, LayerwiseConfig):
            return v.model_dump(exclude_unset=True)
        return v

    @model_validator(mode="after")
    def _layerwise_rules(self) -> QuantizeAlgorithmConfig:
        layerwise = self.layerwise
        if not isinstance(layerwise, LayerwiseConfig):
            return self
        if layerwise.checkpoint_dir is not None and not layerwise.enable:
            raise ValueError(
                "layerwise.checkpoint_dir requires layerwise.enable=True (set enable or drop "
                "checkpoint_dir)"
            )
        if not layerwise.calib_mutates_weights and self._mutates_weights:
            raise ValueError(
                f"layerwise.calib_mutates_weights=False: algorithm {self.method!r} mutates layer "
                "weights in-place; only max, mse and local_hessian (amax-only) take this flag"
            )
        return self

    def to_spec(self) -> dict[str, Any] | None:
        """The ``{"method": name, **options}`` dict this config stands for (None for no calibration)."""
        if self.method is None:
            return None
        options = self.model_dump(exclude_unset=True, exclude={"method"})
        return {"method": self.method, **{self._renames.get(k, k): v for k, v in options.items()}}


class MaxCalibConfig(QuantizeAlgorithmConfig):
    """Max calibration: amax is the running maximum of |x|."""

    _mutates_weights: ClassVar[bool] = False
    method: Literal["max"] = "max"
    distributed_sync: bool | None = True
    shared_states: dict[str, dict[str, list[str]]] | None = None
    """``{"weight_global_amax": {"patterns": [regex, ...]}}``: one NVFP4 weight global amax per group."""
    skip_forward_without_activation_calib: bool = False
    """Calibrate the weights only, skipping the forward, when no activation quantizer needs data."""


class MseCalibConfig(QuantizeAlgorithmConfig):
    """Weight amax searched for the least quantization MSE."""

    _mutates_weights: ClassVar[bool] = False
    method: Literal["mse"] = "mse"
    num_steps: int | None = Field(None, ge=1)
    """Multipliers tried between ``start_multiplier`` and ``stop_multiplier`` (quant's mse)."""
    step_size: float | None = Field(None, gt=0)
    start_multiplier: float | None = Field(None, gt=0)
    stop_multiplier: float | None = Field(None, gt=0)
    distributed_sync: bool | None = True
    fp8_scale_sweep: bool | None = False
    """Calibrate only weights whose custom backend registered a sweep calibrator."""


class SmoothQuantCalibConfig(QuantizeAlgorithmConfig):
    """SmoothQuant: migrate activation outliers into the weights (``alpha`` = migration strength)."""

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float | None = Field(None, ge=0, le=1)


class AWQLiteCalibConfig(QuantizeAlgorithmConfig):
    """AWQ-lite: per-channel activation-aware scale search in steps of ``alpha_step``."""

    method: Literal["awq_lite"] = "awq_lite"
    alpha_step: float | None = Field(0.1, gt=0, le=1)
    debug: bool | None = None


class AWQClipCalibConfig(QuantizeAlgorithmConfig):
    """AWQ-clip: per-block clipping-ratio search from 1 down to ``min_clip_ratio``."""

    method: Literal["awq_clip"] = "awq_clip"
    max_co_batch_size: int | None = Field(None, ge=1)
    max_tokens_per_batch: int | None = Field(None, ge=1)
    min_clip_ratio: float | None = Field(0.5, gt=0, le=1)
    shrink_step: float | None = Field(0.05, gt=0, lt=1)
    debug: bool | None = None


class AWQFullCalibConfig(AWQLiteCalibConfig, AWQClipCalibConfig):
    """AWQ-full: AWQ-lite scale search followed by AWQ-clip (the fields of both)."""

    method: Literal["awq_full"] = "awq_full"


class SVDQuantConfig(QuantizeAlgorithmConfig):
    """SVDQuant: a rank-``lowrank`` high-precision branch beside each quantized weight."""

    method: Literal["svdquant"] = "svdquant"
    lowrank: int | None = Field(32, ge=1)
    skip_layers: list[str] | None = None


class GPTQCalibConfig(QuantizeAlgorithmConfig):
    """GPTQ: error-compensating weight rounding with the inverse Hessian (``perc_damp`` dampening)."""

    method: Literal["gptq"] = "gptq"
    _renames: ClassVar[dict[str, str]] = {"perc_damp": "percdamp"}
    perc_damp: float | None = Field(0.01, ge=0, lt=1)
    block_size: int | None = Field(128, ge=1)
    fused: bool = False

    @model_validator(mode="after")
    def _qdq_from_previous_layer(self) -> GPTQCalibConfig:
        """As in ModelOpt: layerwise GPTQ reads the quantized outputs of earlier layers unless set."""
        layerwise = self.layerwise
        if (
            isinstance(layerwise, LayerwiseConfig)
            and "get_qdq_activations_from_prev_layer" not in layerwise.model_fields_set
        ):
            layerwise.get_qdq_activations_from_prev_layer = True
        return self


class LocalHessianCalibConfig(QuantizeAlgorithmConfig):
    """Per-block weight amax searched for the least local-Hessian-weighted error ``d^T H_bb d``."""

    _mutates_weights: ClassVar[bool] = False
    method: Literal["local_hessian"] = "local_hessian"
    step_size: float | None = 0.1
    start_multiplier: float | None = 0.25
    stop_multiplier: float | None = 4.0
    fp8_scale_sweep: bool | None = False
    block_size: int | None = None
    distributed_sync: bool | None = True


class NVFP4ActHeadroomCalibConfig(QuantizeAlgorithmConfig):
    """NVFP4 activation global amaxes ``max(rho * anchor, upper)`` with headroom above the data."""

    method: Literal["nvfp4_act_headroom"] = "nvfp4_act_headroom"
    anchor_percentile: float = 1.0
    upper_percentile: float = 99.99
    rho: float = 16384.0
    weight_scale_algorithm: dict[str, Any] | None = None


_SCALE_CLASSES: dict[str, type[QuantizeAlgorithmConfig]] = {
    "max": MaxCalibConfig,
    "mse": MseCalibConfig,
    "local_hessian": LocalHessianCalibConfig,
}


def _scale_algorithm(v: Any, where: str) -> Any:
    """A scale algorithm (``"max"``, ``{"method": "mse", ...}`` or a config) as its config class."""
    if v is None or isinstance(v, QuantizeAlgorithmConfig):
        if v is not None and type(v) not in _SCALE_CLASSES.values():
            raise ValueError(f"{where} must be one of {sorted(_SCALE_CLASSES)}, got {v!r}")
        return v
    spec = {"method": v} if isinstance(v, str) else v
    if not isinstance(spec, dict) or spec.get("method") not in _SCALE_CLASSES:
        raise ValueError(
            f"{where} must be {{'method': one of {sorted(_SCALE_CLASSES)}, ...}}, got {v!r}"
        )
    return _SCALE_CLASSES[spec["method"]].model_validate(
        {k: val for k, val in spec.items() if k != "method"}
    )


class LSQConfig(QuantizeAlgorithmConfig):
    """Learned step size (LSQ / Dual-LSQ): ``y = Q_ste(w / s_pre) * s_post`` per block, learning
    the block amaxes (``s = amax / M``) of static block weight quantizers after ``scale_algorithm``
    (``{"method": "mse" | "max" | "local_hessian", ...}``, default mse)."""

    method: Literal["lsq"] = "lsq"
    learnable_amax: list[Literal["pre", "post"]] | Literal["pre", "post"] = ["post"]
    tied_amax: bool = False
    quantize_pre_scale: bool = True
    scale_algorithm: MaxCalibConfig | MseCalibConfig | LocalHessianCalibConfig | None = None
    """Parsed into its config class by ``method`` (``{"method": "max"}`` -> `MaxCalibConfig`);
    given back as the sparse dict ``{"method", **options set}``. None: quant's ``mse``."""

    @field_validator("scale_algorithm", mode="before")
    @classmethod
    def _parse_scale_algorithm(cls, v: Any) -> Any:
        return _scale_algorithm(v, "lsq scale_algorithm")

    @field_serializer("scale_algorithm")
    def _sparse_scale_algorithm(self, v: Any) -> Any:
        return v.to_spec() if isinstance(v, QuantizeAlgorithmConfig) else v

    @model_validator(mode="after")
    def _tied_needs_same_learning(self) -> LSQConfig:
        learn = (
            {self.learnable_amax}
            if isinstance(self.learnable_amax, str)
            else set(self.learnable_amax)
        )
        if self.tied_amax and learn not in (set(), {"pre", "post"}):
            raise ValueError(
                f"tied_amax=True requires learnable_amax [] or ['pre', 'post'], got {self.learnable_amax}"
            )
        return self


def algorithm_spec(spec: Any) -> Any:
    """A config object as its ``{"method", ...}`` dict; anything else unchanged.

    In a ``{"method": ...}`` dict, a :class:`LayerwiseConfig` or a config object given as an
    option (``scale_algorithm``, ``weight_scale_algorithm``) becomes its dict too.
    """
    if isinstance(spec, QuantizeAlgorithmConfig):
        return spec.to_spec()
    if isinstance(spec, dict) and any(isinstance(v, BaseModel) for v in spec.values()):
        return {
            k: v.model_dump(exclude_unset=True)
            if isinstance(v, LayerwiseConfig)
            else algorithm_spec(v)
            for k, v in spec.items()
        }
    return spec


__all__ = [
    "AWQClipCalibConfig",
    "AWQFullCalibConfig",
    "AWQLiteCalibConfig",
    "GPTQCalibConfig",
    "LSQConfig",
    "LayerwiseConfig",
    "LocalHessianCalibConfig",
    "MaxCalibConfig",
    "MseCalibConfig",
    "NVFP4ActHeadroomCalibConfig",
    "QuantizeAlgorithmConfig",
    "SVDQuantConfig",
    "SmoothQuantCalibConfig",
    "algorithm_spec",
]

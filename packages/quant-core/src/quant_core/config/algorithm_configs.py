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

from pydantic import BaseModel, ConfigDict, Field, model_validator


class QuantizeAlgorithmConfig(BaseModel):
    """Base of the algorithm configs; ``method=None`` means no calibration."""

    model_config = ConfigDict(extra="forbid")
    _renames: ClassVar[dict[str, str]] = {}

    method: None = None
    layerwise: bool | dict[str, Any] | Literal["auto"] | None = None
    """Layer-by-layer calibration (see :mod:`quant_core.layerwise`); ``"auto"``: when the model
    has a decoder stack."""

    def to_spec(self) -> dict[str, Any] | None:
        """The ``{"method": name, **options}`` dict this config stands for (None for no calibration)."""
        if self.method is None:
            return None
        options = self.model_dump(exclude_unset=True, exclude={"method"})
        return {"method": self.method, **{self._renames.get(k, k): v for k, v in options.items()}}


class MaxCalibConfig(QuantizeAlgorithmConfig):
    """Max calibration: amax is the running maximum of |x|."""

    method: Literal["max"] = "max"
    distributed_sync: bool | None = True


class MseCalibConfig(QuantizeAlgorithmConfig):
    """Weight amax searched for the least quantization MSE."""

    method: Literal["mse"] = "mse"
    step_size: float | None = Field(None, gt=0)
    start_multiplier: float | None = Field(None, gt=0)
    stop_multiplier: float | None = Field(None, gt=0)
    distributed_sync: bool | None = True


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


class LocalHessianCalibConfig(QuantizeAlgorithmConfig):
    """Per-block weight amax searched for the least local-Hessian-weighted error ``d^T H_bb d``."""

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


class LSQConfig(QuantizeAlgorithmConfig):
    """Learned step size (LSQ / Dual-LSQ): ``y = Q_ste(w / s_pre) * s_post`` per block, learning
    the block amaxes (``s = amax / M``) of static block weight quantizers after ``scale_algorithm``
    (``{"method": "mse" | "max" | "local_hessian", ...}``, default mse)."""

    method: Literal["lsq"] = "lsq"
    learnable_amax: list[Literal["pre", "post"]] | Literal["pre", "post"] = ["post"]
    tied_amax: bool = False
    quantize_pre_scale: bool = True
    scale_algorithm: dict[str, Any] | None = None

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
    """A config object as its ``{"method", ...}`` dict; anything else unchanged."""
    return spec.to_spec() if isinstance(spec, QuantizeAlgorithmConfig) else spec


__all__ = [
    "AWQClipCalibConfig",
    "AWQFullCalibConfig",
    "AWQLiteCalibConfig",
    "GPTQCalibConfig",
    "LSQConfig",
    "LocalHessianCalibConfig",
    "MaxCalibConfig",
    "MseCalibConfig",
    "NVFP4ActHeadroomCalibConfig",
    "QuantizeAlgorithmConfig",
    "SVDQuantConfig",
    "SmoothQuantCalibConfig",
    "algorithm_spec",
]

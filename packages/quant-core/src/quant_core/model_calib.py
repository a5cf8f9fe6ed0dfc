"""ModelOpt's ``model_calib`` functions: each runs one calibration algorithm on a quantized model.

Each is ``mtq.calibrate(model, {"method": name, **options}, forward_loop)``; options the
algorithm here does not take are refused by name. ``layerwise_calibrate`` runs any calibration
function one decoder layer at a time (what ``{"method": ..., "layerwise": True}`` does).
`enable_stats_collection` / `finish_stats_collection` are ModelOpt's manual calibration switches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quant_core.algorithms.max import needs_activation_forward
from quant_core.algorithms.nvfp4_act_headroom import (
    is_nvfp4_dynamic_input_quantizer,
    swap_in_headroom_calibrators,
)
from quant_core.algorithms.smoothing_toggle import (
    apply_pre_quant_scale_and_smooth,
    disable_pre_quant_scale_and_resmooth,
)
from quant_core.algorithms.statistics import reduce_quantizer_statistics
from quant_core.algorithms.weight_mse import (
    FP8_SWEEP_CALIBRATORS,
    make_weight_mse_calibrator,
    register_fp8_sweep_calibrator,
)
from quant_core.calib import HistogramCalibrator, MaxCalibrator
from quant_core.config.algorithm_configs import QuantizeAlgorithmConfig
from quant_core.model_quant import calibrate
from quant_core.nn.tensor_quantizer import TensorQuantizer

ForwardLoop = Callable[[nn.Module], Any] | None

# ModelOpt's private names for the selection and calibrator swap of ``nvfp4_act_headroom``.
_is_nvfp4_dynamic_input_quantizer = is_nvfp4_dynamic_input_quantizer
_swap_in_nvfp4_act_headroom_calibrators = swap_in_headroom_calibrators
_needs_activation_forward_for_max_calib = needs_activation_forward
_FP8_SWEEP_CALIBRATOR_REGISTRY = FP8_SWEEP_CALIBRATORS
_register_fp8_sweep_calibrator = register_fp8_sweep_calibrator
_make_weight_mse_calibrator = make_weight_mse_calibrator


def _run(method: str, model: nn.Module, forward_loop: ForwardLoop, options: dict[str, Any]) -> None:
    calibrate(model, {"method": method, **options}, forward_loop)


def max_calibrate(
    model: nn.Module,
    forward_loop: ForwardLoop = None,
    distributed_sync: bool = True,
    shared_states: dict[str, dict[str, list[str]]] | None = None,
    skip_forward_without_activation_calib: bool = False,
) -> None:
    """Max calibration: every static quantizer's amax is the maximum |x| it saw.

    ``shared_states={"weight_global_amax": {"patterns": [...]}}`` gives the static NVFP4 weights
    of each pattern's groups one global amax (see :func:`quant_core.algorithms.max.max_algorithm`).
    ``skip_forward_without_activation_calib=True`` skips ``forward_loop`` when no activation
    quantizer needs data (weights are still calibrated).
    """
    options: dict[str, Any] = {
        "distributed_sync": distributed_sync,
        "skip_forward_without_activation_calib": skip_forward_without_activation_calib,
    }
    if shared_states is not None:
        options["shared_states"] = shared_states
    _run("max", model, forward_loop, options)


def mse_calibrate(model: nn.Module, forward_loop: ForwardLoop = None, **options: Any) -> None:
    """Weight amax searched for the least quantization MSE (after max calibration)."""
    _run("mse", model, forward_loop, options)


def smoothquant(
    model: nn.Module, forward_loop: ForwardLoop = None, alpha: float | None = None, **options: Any
) -> None:
    """SmoothQuant (``alpha=None`` searches the migration strength per layer)."""
    _run("smoothquant", model, forward_loop, {"alpha": alpha, **options})


def awq(
    model: nn.Module, forward_loop: ForwardLoop = None, algorithm: str = "awq_lite", **options: Any
) -> None:
    """AWQ: ``algorithm`` is ``"awq_lite"`` (scales), ``"awq_clip"`` (clipping) or ``"awq_full"`` (both)."""
    if algorithm not in ("awq_lite", "awq_clip", "awq_full"):
        raise ValueError(f"awq algorithm must be awq_lite, awq_clip or awq_full, got {algorithm!r}")
    _run(algorithm, model, forward_loop, options)


def awq_lite(
    model: nn.Module,
    forward_loop: ForwardLoop = None,
    alpha_step: float = 0.1,
    debug: bool = False,
    **options: Any,
) -> None:
    """AWQ-lite: per-channel input scales searched over ``alpha`` in steps of ``alpha_step``."""
    _run("awq_lite", model, forward_loop, {"alpha_step": alpha_step, "debug": debug, **options})


def awq_clip(
    model: nn.Module, forward_loop: ForwardLoop = None, debug: bool = False, **options: Any
) -> None:
    """AWQ-clip: per-block weight clipping ratios searched for the least output error."""
    _run("awq_clip", model, forward_loop, {"debug": debug, **options})


def svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors ``(us, vt)`` of ``weight`` (``us @ vt`` approximates it).

    Computed in float64 and returned in ``weight``'s dtype and device: ``us`` is
    ``(rows, rank)``, the left singular vectors times the singular values, ``vt`` is
    ``(rank, cols)``. A ``rank`` above ``min(rows, cols)`` warns and pads both with zeros.
    """
    u, s, vt = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    us, vt = u[:, :rank] * s[:rank], vt[:rank]
    kept = s.shape[0]
    if kept < rank:
        warnings.warn(
            f"svd: rank {rank} exceeds the weight's {tuple(weight.shape)} dimensions; the factors "
            f"have rank {kept} and are padded with zeros",
            stacklevel=2,
        )
        us = torch.nn.functional.pad(us, (0, rank - kept))
        vt = torch.nn.functional.pad(vt, (0, 0, 0, rank - kept))
    return us.to(weight.dtype), vt.to(weight.dtype)


def svdquant(
    model: nn.Module, forward_loop: ForwardLoop = None, lowrank: int = 32, **options: Any
) -> None:
    """SVDQuant: a rank-``lowrank`` high-precision branch beside each quantized weight."""
    _run("svdquant", model, forward_loop, {"lowrank": lowrank, **options})


def gptq(model: nn.Module, forward_loop: ForwardLoop = None, **options: Any) -> None:
    """GPTQ weight rounding (``percdamp``, ``block_size``, ``act_order`` options)."""
    _run("gptq", model, forward_loop, options)


def local_hessian_calibrate(
    model: nn.Module, forward_loop: ForwardLoop = None, **options: Any
) -> None:
    """Per-block weight amax searched for the least local-Hessian-weighted error (``step_size``,
    ``start_multiplier``, ``stop_multiplier``, ``block_size``, ``distributed_sync``)."""
    _run("local_hessian", model, forward_loop, options)


def nvfp4_act_headroom_calibrate(
    model: nn.Module,
    forward_loop: ForwardLoop = None,
    *,
    anchor_percentile: float = 1.0,
    upper_percentile: float = 99.99,
    rho: float = 16384.0,
    weight_scale_algorithm: Any = None,
) -> None:
    """NVFP4 input global amaxes with headroom, ``max(rho * anchor, upper)`` of the block amaxes."""
    options = {
        "anchor_percentile": anchor_percentile,
        "upper_percentile": upper_percentile,
        "rho": rho,
        "weight_scale_algorithm": weight_scale_algorithm,
    }
    _run("nvfp4_act_headroom", model, forward_loop, options)


def lsq(
    model: nn.Module,
    forward_loop: ForwardLoop = None,
    scale_algorithm: dict[str, Any] | None = None,
    learnable_amax: list[str] | str = ("post",),
    tied_amax: bool = False,
    quantize_pre_scale: bool = True,
) -> None:
    """Calibrate weight scales with ``scale_algorithm`` (default mse), then learn the block amaxes
    of static block weight quantizers (LSQ; see :mod:`quant_core.nn.lsq`)."""
    lsq_options = dict(scale_algorithm=scale_algorithm, learnable_amax=learnable_amax)
    _run(
        "lsq",
        model,
        forward_loop,
        {**lsq_options, "tied_amax": tied_amax, "quantize_pre_scale": quantize_pre_scale},
    )


_SCALE_FUNCTIONS = {
    "max": "max_calibrate",
    "mse": "mse_calibrate",
    "local_hessian": "local_hessian_calibrate",
}


def _run_weight_scale_calibration(
    model: nn.Module, forward_loop: ForwardLoop, scale_algorithm: Any
) -> None:
    """``lsq``'s first step (ModelOpt's name): run ``scale_algorithm`` (``"mse"``, a
    ``{"method": ..., **options}`` dict or its config) with this module's function for it, given
    only the options that were set."""
    if isinstance(scale_algorithm, QuantizeAlgorithmConfig):
        spec = scale_algorithm.to_spec()
    else:
        spec = (
            {"method": scale_algorithm}
            if isinstance(scale_algorithm, str)
            else dict(scale_algorithm)
        )
    method = spec.pop("method", None)
    if method not in _SCALE_FUNCTIONS:
        raise ValueError(
            f"lsq scale_algorithm must be one of {sorted(_SCALE_FUNCTIONS)}, got {method!r}"
        )
    globals()[_SCALE_FUNCTIONS[method]](model, forward_loop=forward_loop, **spec)


def layerwise_calibrate(
    model: nn.Module,
    forward_loop: ForwardLoop,
    calib_func: Callable[..., Any],
    **calib_kwargs: Any,
) -> None:
    """Run ``calib_func(layer, layer_forward_loop, **calib_kwargs)`` on each decoder layer in turn.

    ``layer_forward_loop`` replays the inputs ``forward_loop`` gives that layer (see
    :mod:`quant_core.layerwise`); the model's quantizers outside the decoder layers are calibrated
    last. ``get_qdq_activations_from_prev_layer`` (default False) feeds each layer the outputs of
    the previous one after its calibration, fully quantized, instead of as one whole-model
    calibration pass computes them. ``checkpoint_dir`` / ``save_every`` (per-layer checkpoints)
    and ``calib_mutates_weights=False`` are refused by name.
    """
    from quant_core.layerwise import layerwise_calibrate as _layerwise

    for key in ("checkpoint_dir", "save_every"):
        if calib_kwargs.get(key) is not None:
            raise ValueError(
                f"layerwise_calibrate: {key} (per-layer checkpoints) is not supported by quant-core"
            )
        calib_kwargs.pop(key, None)
    if calib_kwargs.pop("calib_mutates_weights", True) is not True:
        raise ValueError(
            "layerwise_calibrate: calib_mutates_weights=False is not supported by quant-core's "
            "layer-by-layer calibration; leave it at True"
        )
    qdq_from_prev = bool(calib_kwargs.pop("get_qdq_activations_from_prev_layer", False))
    if forward_loop is None:
        raise ValueError("layerwise_calibrate needs a forward_loop to capture the layer inputs")
    _layerwise(model, calib_func, forward_loop, calib_kwargs, qdq_from_prev)


def _enabled_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]


def enable_stats_collection(model: nn.Module) -> None:
    """Every enabled quantizer passes its input through unquantized and collects statistics
    (quantizers with a constant amax only stop quantizing). Run forward passes, then
    `finish_stats_collection`."""
    for q in _enabled_quantizers(model):
        q.disable_quant()
        if not q.has_constant_amax:
            q.enable_calib()


def finish_stats_collection(model: nn.Module, method: str | None = None, **kwargs: Any) -> None:
    """Load each enabled quantizer's amax from the statistics it collected and quantize again.

    ``method`` (``"entropy"``, ``"percentile"``, ``"mse"``) and ``kwargs`` (e.g. ``percentile=99.9``)
    go to histogram calibrators' ``compute_amax``; ``kwargs`` alone to custom calibrators. A
    quantizer that collected nothing keeps its amax; a constant amax is never replaced.
    Under ``torch.distributed`` the statistics are first reduced over the ranks.
    """
    reduce_quantizer_statistics(_enabled_quantizers(model))
    for q in _enabled_quantizers(model):
        if not q.has_constant_amax:
            if isinstance(q.calibrator, HistogramCalibrator) and not q.is_dynamic:
                q.load_calib_amax(method, **kwargs)
            elif kwargs and not isinstance(q.calibrator, MaxCalibrator):
                q.load_calib_amax(**kwargs)
            else:
                q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


__all__ = [
    "apply_pre_quant_scale_and_smooth",
    "awq",
    "awq_clip",
    "awq_lite",
    "disable_pre_quant_scale_and_resmooth",
    "enable_stats_collection",
    "finish_stats_collection",
    "gptq",
    "layerwise_calibrate",
    "local_hessian_calibrate",
    "lsq",
    "max_calibrate",
    "mse_calibrate",
    "nvfp4_act_headroom_calibrate",
    "smoothquant",
    "svd",
    "svdquant",
]

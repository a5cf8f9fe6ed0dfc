"""Turn a smoothed layer's pre-quant scale off and on again (ModelOpt 0.47's
``disable_pre_quant_scale_and_resmooth`` / ``apply_pre_quant_scale_and_smooth``).

A smoothed Linear computes ``Q(x * p) Q(W / p)^T``. Disabling folds ``p`` back into the weight
(``W``), keeps ``p`` in the input quantizer's ``_disabled_pre_quant_scale`` buffer, and recalibrates
the weight and a static per-tensor input amax (``max_j a_j``, from the per-channel input amax
``a`` that smoothquant records as ``_amax_for_smoothing``). Applying does the reverse with the kept
or a given ``p``: the weight becomes ``W / p`` and the input amax ``max_j a_j p_j``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quant_core.algorithms.weights import apply_input_scale, calibrate_weight, first_stage

__all__ = ["apply_pre_quant_scale_and_smooth", "disable_pre_quant_scale_and_resmooth"]


def _check_linear(linear: nn.Module) -> None:
    if not (
        isinstance(linear, nn.Linear)
        and hasattr(linear, "input_quantizer")
        and hasattr(linear, "weight_quantizer")
    ):
        raise ValueError(f"expected a quantized Linear, got {type(linear).__name__}")


def _act_amax(linear: nn.Module) -> Tensor | None:
    """The recorded per-channel input amax; ValueError when a calibrated input amax needs it."""
    stage = first_stage(linear.input_quantizer)
    act_amax = stage._buffers.get("_amax_for_smoothing")
    if act_amax is None and stage.amax is not None and not stage.is_dynamic:
        raise ValueError(
            f"{stage._name or 'input quantizer'} has a calibrated amax but no per-channel input "
            "amax (_amax_for_smoothing, recorded by smoothquant) to recompute it from"
        )
    return act_amax


@torch.no_grad()
def disable_pre_quant_scale_and_resmooth(
    linear: nn.Module, delete_pre_quant_scale: bool = False
) -> None:
    """Fold ``linear``'s input pre-quant scale back into its weight and stop applying it.

    The weight quantizer is max-calibrated again, a static per-tensor input amax becomes the
    largest recorded per-channel input amax. The scale is kept for
    :func:`apply_pre_quant_scale_and_smooth` unless ``delete_pre_quant_scale``.
    """
    _check_linear(linear)
    quantizer = linear.input_quantizer
    scale = quantizer.pre_quant_scale
    if scale is None:
        raise ValueError("disable_pre_quant_scale_and_resmooth: the input has no pre_quant_scale")
    act_amax = _act_amax(linear)
    linear.weight.mul_(scale.float().reshape(-1).to(linear.weight))
    quantizer.pre_quant_scale = None
    stage = first_stage(quantizer)
    stage._buffers.pop("_disabled_pre_quant_scale", None)
    if not delete_pre_quant_scale:
        stage.register_buffer("_disabled_pre_quant_scale", scale.detach().clone())
    calibrate_weight(linear)
    if act_amax is not None and stage.amax is not None and stage.amax.dim() == 0:
        stage.amax = act_amax.float().amax()


@torch.no_grad()
def apply_pre_quant_scale_and_smooth(
    linear: nn.Module, pre_quant_scale: Tensor | None = None
) -> None:
    """Apply ``pre_quant_scale`` (default: the one kept when it was disabled) to ``linear``'s
    input and divide the weight by it, recalibrating the weight and a static per-tensor input
    amax (``max_j a_j p_j``). The layer must have no pre-quant scale applied; scales must be > 0."""
    _check_linear(linear)
    quantizer = linear.input_quantizer
    if quantizer.pre_quant_scale is not None:
        raise ValueError("apply_pre_quant_scale_and_smooth: a pre_quant_scale is already applied")
    stage = first_stage(quantizer)
    if pre_quant_scale is None:
        pre_quant_scale = stage._buffers.get("_disabled_pre_quant_scale")
    if pre_quant_scale is None:
        raise ValueError("apply_pre_quant_scale_and_smooth: no pre_quant_scale given or kept")
    scale = pre_quant_scale.detach().float().reshape(-1)
    if not bool((scale > 0).all()):
        raise ValueError("apply_pre_quant_scale_and_smooth: pre_quant_scale must be positive")
    apply_input_scale(linear, 1.0 / scale, _act_amax(linear))
    stage._buffers.pop("_disabled_pre_quant_scale", None)

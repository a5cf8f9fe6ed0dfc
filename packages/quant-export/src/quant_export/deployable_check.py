"""The checkpoint exporters' one check of the model: deployable as it is, or refused by name.

Calibration leaves the model in the state the checkpoints hold (:func:`quant_core.make_deployable`:
shared scales for fused layers, pre-quant scales folded where they can be). Exporters only read the
model, so a model that is not in that state (scales edited by hand, restored from a save made
before input groups were recorded) is refused with what to call, never changed on the way out.
"""

from __future__ import annotations

import warnings

from torch import nn

from quant_core.conversion import iter_tensor_quantizers
from quant_core.deployable import deployment_mismatches
from quant_core.diagnostics import QuantWarning, name_list
from quant_core.input_groups import has_record
from quant_core.nn import TensorQuantizer
from quant_export.quantizers import UnsupportedFormatError, refuse_compressed

__all__ = ["check_deployable", "pre_quant_scaled_layers"]

_FIX = (
    "call quant_core.make_deployable(model) once before exporting (after "
    "quant_core.record_input_groups(model, forward_loop) if the model was restored from a save "
    "made before input groups were recorded)"
)


def pre_quant_scaled_layers(model: nn.Module, prefix: str = "") -> list[str]:
    """Layers (under ``prefix``) whose input quantizer still carries a pre-quant scale
    (SmoothQuant / AWQ not folded)."""
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix)
        and isinstance(iq := getattr(module, "input_quantizer", None), TensorQuantizer)
        and iq.pre_quant_scale is not None
    ]


def check_deployable(
    model: nn.Module,
    *,
    share_fused_scales: bool = True,
    pre_quant_scale: bool = True,
    prefix: str = "",
) -> None:
    """Raise UnsupportedFormatError unless ``model`` can be written as it is.

    Refuses compressed models, and models whose fused layers (q/k/v, gate/up, experts, K/V) keep
    scales that engines would apply differently (with ``share_fused_scales=False`` a QuantWarning
    names them instead, for loaders that keep per-layer scales). ``pre_quant_scale=False`` (a layout
    without that tensor) also refuses layers whose pre-quant scale could not be folded.
    ``prefix`` (a module name ending in a dot) checks only the layers under that module.
    """
    refuse_compressed(model)
    if not has_record(model) and any(q.is_enabled for _n, q in iter_tensor_quantizers(model)):
        warnings.warn(
            f"{type(model).__name__} has no record of which layers read one input (it was not "
            "calibrated with quant_core.calibrate/quantize): scales of fused layers are not "
            f"checked; {_FIX}",
            QuantWarning,
            stacklevel=3,
        )
    problems = deployment_mismatches(model, prefix=prefix)
    if problems and share_fused_scales:
        raise UnsupportedFormatError(
            "the model is not in the state a checkpoint holds: "
            + name_list(problems, 6, "; ")
            + f". Exporters do not change the model: {_FIX}"
        )
    if problems:
        warnings.warn(
            "share_fused_scales=False: "
            + name_list(problems, 6, "; ")
            + ". Loaders that keep per-layer scales (transformers) read them right; vLLM, SGLang "
            "and TensorRT-LLM fuse these layers with one scale and would compute wrong outputs",
            QuantWarning,
            stacklevel=3,
        )
    kept = [] if pre_quant_scale else pre_quant_scaled_layers(model, prefix)
    if kept:
        raise UnsupportedFormatError(
            f"pre-quant scales of {', '.join(kept)} are not folded (quant_core.make_deployable "
            "folds a scale into the norm before its layers or the layer producing its input; "
            "these have none, or a quantized V cache reads it); the compressed-tensors layout "
            "has no pre_quant_scale: export with the modelopt layout or quantize without "
            "SmoothQuant/AWQ"
        )

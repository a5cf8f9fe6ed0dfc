"""ModelOpt path ``nn.modules.tensor_quantizer``: TensorQuantizer, SequentialQuantizer,
GroupedQuantizer, StaticBlockScaleQuantizer, NVFP4StaticQuantizer and the custom-backend registry
(with ModelOpt's private names ``_amax_to_scale`` and ``_FP8_E4M3_MIN_POSITIVE``)."""

from quant_core.nn.block_scale import (
    FP8_E4M3_MIN_POSITIVE,
    StaticBlockScaleQuantizer,
    amax_to_scale,
)
from quant_core.nn.grouped import GroupedQuantizer
from quant_core.nn.nvfp4_static import NVFP4StaticQuantizer
from quant_core.nn.quant_backends import (
    _BACKENDS,
    TensorQuantizerCache,
    is_registered_quant_backend,
    register_quant_backend,
    unregister_quant_backend,
)
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

_amax_to_scale = amax_to_scale
_QUANT_FUNCTIONAL_BACKENDS = _BACKENDS  # the registry register_quant_backend fills
_FP8_E4M3_MIN_POSITIVE = FP8_E4M3_MIN_POSITIVE

__all__ = [
    "GroupedQuantizer",
    "NVFP4StaticQuantizer",
    "SequentialQuantizer",
    "StaticBlockScaleQuantizer",
    "TensorQuantizer",
    "TensorQuantizerCache",
    "is_registered_quant_backend",
    "register_quant_backend",
    "unregister_quant_backend",
]

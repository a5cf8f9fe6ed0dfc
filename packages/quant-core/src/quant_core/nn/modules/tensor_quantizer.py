"""ModelOpt path ``nn.modules.tensor_quantizer``: TensorQuantizer, SequentialQuantizer,
GroupedQuantizer, NVFP4StaticQuantizer and the custom-backend registry."""

from quant_core.nn.grouped import GroupedQuantizer
from quant_core.nn.nvfp4_static import NVFP4StaticQuantizer
from quant_core.nn.quant_backends import (
    TensorQuantizerCache,
    is_registered_quant_backend,
    register_quant_backend,
    unregister_quant_backend,
)
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "GroupedQuantizer",
    "NVFP4StaticQuantizer",
    "SequentialQuantizer",
    "TensorQuantizer",
    "TensorQuantizerCache",
    "is_registered_quant_backend",
    "register_quant_backend",
    "unregister_quant_backend",
]

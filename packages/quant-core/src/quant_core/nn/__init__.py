"""Quantized modules, TensorQuantizer and the module registry."""

from quant_core.nn import modules
from quant_core.nn.builtin_modules import (
    BMM,
    MatMul,
    QuantBMM,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
)
from quant_core.nn.grouped import GroupedQuantizer
from quant_core.nn.modules import *  # noqa: F403
from quant_core.nn.quant_backends import TensorQuantizerCache
from quant_core.nn.quant_module import QuantInputBase, QuantLinearConvBase, QuantModule
from quant_core.nn.registry import QuantModuleRegistry
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    *modules.__all__,
    "modules",
    "BMM",
    "GroupedQuantizer",
    "MatMul",
    "QuantBMM",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantInputBase",
    "QuantLinear",
    "QuantLinearConvBase",
    "QuantModule",
    "QuantModuleRegistry",
    "SequentialQuantizer",
    "TensorQuantizer",
    "TensorQuantizerCache",
]

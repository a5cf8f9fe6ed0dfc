"""ModelOpt path ``nn.modules.tensor_quantizer``: TensorQuantizer and SequentialQuantizer."""

from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = ["SequentialQuantizer", "TensorQuantizer"]

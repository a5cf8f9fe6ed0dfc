"""ModelOpt's ``quantization.qtensor`` path: real quantized tensors (packed codes plus scales)."""

from quant_core.qtensor.base_qtensor import BaseQuantizedTensor
from quant_core.qtensor.nvfp4_tensor import NVFP4QTensor

__all__ = ["BaseQuantizedTensor", "NVFP4QTensor"]

"""Real low-bit weights in memory: `compress` turns quantized linears into `CompressedLinear`."""

from quant_core.compress.backends import BACKENDS, Backend, register_backend, select_backend
from quant_core.compress.formats import WeightFormat, weight_format
from quant_core.compress.module import CompressedLinear, compress, weight_codes

__all__ = [
    "BACKENDS",
    "Backend",
    "CompressedLinear",
    "WeightFormat",
    "compress",
    "register_backend",
    "select_backend",
    "weight_codes",
    "weight_format",
]

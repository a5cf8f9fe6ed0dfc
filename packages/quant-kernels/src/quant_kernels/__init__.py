"""quant-kernels: the numerics of quant (fake quantization, format table, codes and packing).

See the package README's "Public API" section for the contract the upper layers use.
"""

from quant_kernels._version import __version__
from quant_kernels.blocking import reduce_amax
from quant_kernels.codes import QuantizedTensor, dequantize_codes, format_codes, quantize_to_codes
from quant_kernels.dispatch import (
    available_backends,
    fake_quantize,
    fake_quantize_format,
    select_backend,
)
from quant_kernels.formats import (
    E2M1_MAX,
    E4M3_MAX,
    FORMATS,
    ElementFormat,
    FormatSpec,
    QuantFormat,
    ScaleMode,
    nvfp4_global_amax,
)
from quant_kernels.grid import fake_quantize_grid, fake_quantize_with_scale, grid_scale
from quant_kernels.packing import (
    e8m0_to_float,
    exponent_to_e8m0,
    pack_fp4,
    pack_int4,
    unpack_fp4,
    unpack_int4,
)

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "FORMATS",
    "ElementFormat",
    "FormatSpec",
    "QuantFormat",
    "QuantizedTensor",
    "ScaleMode",
    "__version__",
    "available_backends",
    "dequantize_codes",
    "e8m0_to_float",
    "exponent_to_e8m0",
    "fake_quantize",
    "fake_quantize_format",
    "fake_quantize_grid",
    "fake_quantize_with_scale",
    "format_codes",
    "grid_scale",
    "nvfp4_global_amax",
    "pack_fp4",
    "pack_int4",
    "quantize_to_codes",
    "reduce_amax",
    "select_backend",
    "unpack_fp4",
    "unpack_int4",
]

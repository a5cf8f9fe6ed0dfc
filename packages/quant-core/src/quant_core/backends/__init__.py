"""ModelOpt's ``quantization.backends``: the registry of real low-precision GEMMs quantized linear
layers may run instead of their fake-quantized matmul (see :mod:`.gemm_registry`)."""

from quant_core.backends.gemm_registry import *  # noqa: F403
from quant_core.backends.gemm_registry import __all__ as _names

__all__ = list(_names)

"""ModelOpt's ``quantization.utils`` package: ``core_utils`` (is a module quantized, amax and sum
reductions, the parameter-name index), ``numeric_utils`` (the MXFP4 -> NVFP4 cast numerics) and
``calib_utils`` (the running Hessian GPTQ collects), ``shared_input`` (a shared NVFP4 weight
global amax); the names ModelOpt exports at package level
are importable from here too."""

from quant_core.utils import calib_utils, core_utils, numeric_utils, shared_input
from quant_core.utils.core_utils import *  # noqa: F403
from quant_core.utils.core_utils import __all__ as _core_names
from quant_core.utils.shared_input import SharedWeightGlobalAmaxState

__all__ = [
    "SharedWeightGlobalAmaxState",
    "calib_utils",
    "core_utils",
    "numeric_utils",
    "shared_input",
    *_core_names,
]

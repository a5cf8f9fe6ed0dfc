"""quant-core: quantize PyTorch models with ModelOpt's API (``import quant_core as mtq``)."""

from quant_core import algorithms, calib, config, nn
from quant_core._version import __version__
from quant_core.config import *  # noqa: F403  the built-in *_CFG dicts
from quant_core.config import QuantizeConfig, QuantizerAttributeConfig, choices
from quant_core.conversion import (
    disable_quantizer,
    enable_quantizer,
    register,
    set_quantizer_attribute,
    set_quantizer_by_cfg,
    unregister,
)
from quant_core.model_quant import (
    CalibrationError,
    calibrate,
    fold_weight,
    postprocess_amax,
    quantize,
)
from quant_core.nn import QuantModuleRegistry, SequentialQuantizer, TensorQuantizer
from quant_core.plugins import auto_quantize
from quant_core.save_restore import quantizer_state, restore, restore_quantizer_state, save
from quant_core.summary import print_quant_summary, quant_summary

__all__ = [
    "CalibrationError",
    "QuantModuleRegistry",
    "QuantizeConfig",
    "QuantizerAttributeConfig",
    "SequentialQuantizer",
    "TensorQuantizer",
    "__version__",
    "algorithms",
    "auto_quantize",
    "calib",
    "calibrate",
    "choices",
    "config",
    "disable_quantizer",
    "enable_quantizer",
    "fold_weight",
    "nn",
    "postprocess_amax",
    "print_quant_summary",
    "quant_summary",
    "quantize",
    "quantizer_state",
    "register",
    "restore",
    "restore_quantizer_state",
    "save",
    "set_quantizer_attribute",
    "set_quantizer_by_cfg",
    "unregister",
    *config.__all__,
]

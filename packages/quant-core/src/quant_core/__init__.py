"""quant-core: quantize PyTorch models with ModelOpt's API (``import quant_core as mtq``)."""

from quant_core import algorithms, calib, config, model_calib, nn, opt, qtensor, tensor_quant, utils
from quant_core._version import __version__
from quant_core.compress import compress
from quant_core.config import *  # noqa: F403  the built-in *_CFG dicts
from quant_core.config import QuantizeConfig, QuantizerAttributeConfig, choices
from quant_core.config.algorithm_configs import *  # noqa: F403  ModelOpt's algorithm config classes
from quant_core.config.helpers import (
    find_quant_cfg_entry_by_path,
    load_config,
    need_calibration,
    normalize_quant_cfg_list,
    update_quant_cfg_with_kv_cache_quant,
)
from quant_core.conversion import (
    disable_quantizer,
    enable_quantizer,
    preserve_quantizer_attributes_context,
    register,
    replace_quant_module,
    set_quantizer_attribute,
    set_quantizer_attributes_full,
    set_quantizer_attributes_partial,
    set_quantizer_by_cfg,
    set_quantizer_by_cfg_context,
    unregister,
)
from quant_core.deployable import DeployReport, deployment_mismatches, make_deployable
from quant_core.diagnostics import QuantWarning
from quant_core.input_groups import input_groups, record_input_groups
from quant_core.model_quant import (
    CalibrationError,
    calibrate,
    compute_quantization_mse,
    fold_weight,
    postprocess_amax,
    quantize,
    temporarily_fold_weights,
)
from quant_core.nn import QuantModuleRegistry, SequentialQuantizer, TensorQuantizer
from quant_core.plugins import auto_quantize, get_auto_quantize_config, plot_sensitivity
from quant_core.save_restore import quantizer_state, restore, restore_quantizer_state, save
from quant_core.summary import print_quant_summary, quant_summary

__all__ = [
    "CalibrationError",
    "DeployReport",
    "deployment_mismatches",
    "input_groups",
    "make_deployable",
    "record_input_groups",
    "QuantWarning",
    "QuantModuleRegistry",
    "QuantizeConfig",
    "QuantizerAttributeConfig",
    "SequentialQuantizer",
    "TensorQuantizer",
    "__version__",
    "algorithms",
    "auto_quantize",
    "get_auto_quantize_config",
    "plot_sensitivity",
    "calib",
    "calibrate",
    "choices",
    "compress",
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
    "compute_quantization_mse",
    "find_quant_cfg_entry_by_path",
    "load_config",
    "model_calib",
    "need_calibration",
    "normalize_quant_cfg_list",
    "opt",
    "qtensor",
    "preserve_quantizer_attributes_context",
    "replace_quant_module",
    "set_quantizer_attributes_full",
    "set_quantizer_attributes_partial",
    "set_quantizer_by_cfg_context",
    "temporarily_fold_weights",
    "tensor_quant",
    "update_quant_cfg_with_kv_cache_quant",
    "utils",
    *config.__all__,
]

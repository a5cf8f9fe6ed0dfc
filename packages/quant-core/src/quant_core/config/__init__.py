"""Quantization configs: the validated schema, the built-in ``*_CFG`` dicts and ``choices``."""

from quant_core.config import builtin as _builtin
from quant_core.config.algorithm_configs import *  # noqa: F403
from quant_core.config.algorithm_configs import __all__ as _algorithm_names
from quant_core.config.builtin import *  # noqa: F403
from quant_core.config.helpers import (
    find_quant_cfg_entry_by_path,
    load_config,
    match_bare_quantizer_cfg,
    need_calibration,
    normalize_quant_cfg_list,
    update_quant_cfg_with_kv_cache_quant,
)
from quant_core.config.schema import (
    QuantCfgEntry,
    QuantizeConfig,
    QuantizerAttributeConfig,
    QuantizerCfgEntry,
    RotateConfig,
    normalize_quant_cfg,
    parse_attributes,
    validate_config,
)

__all__ = [
    "QuantCfgEntry",
    "QuantizeConfig",
    "QuantizerCfgEntry",
    "QuantizerAttributeConfig",
    "RotateConfig",
    "normalize_quant_cfg",
    "parse_attributes",
    "validate_config",
    "find_quant_cfg_entry_by_path",
    "load_config",
    "match_bare_quantizer_cfg",
    "need_calibration",
    "normalize_quant_cfg_list",
    "update_quant_cfg_with_kv_cache_quant",
    *(n for n in _algorithm_names if n != "algorithm_spec"),
]
__all__ += _builtin.__all__

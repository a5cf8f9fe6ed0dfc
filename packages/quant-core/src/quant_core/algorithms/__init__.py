"""Calibration algorithms, registered by name; every algorithm module in this folder is imported here."""

import importlib
import pkgutil

from quant_core.algorithms.registry import available_algorithms, get_algorithm, register_algorithm
from quant_core.config.helpers import match_bare_quantizer_cfg

# ModelOpt's name (in its ``algorithms`` module) for the bare-name config lookup AutoQuantize uses.
_match_quantizer_cfg = match_bare_quantizer_cfg

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("registry",) and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["available_algorithms", "get_algorithm", "register_algorithm"]

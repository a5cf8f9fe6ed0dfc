"""Calibration algorithms, registered by name; every algorithm module in this folder is imported here."""

import importlib
import pkgutil

from quant_core.algorithms.registry import available_algorithms, get_algorithm, register_algorithm

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("registry",) and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["available_algorithms", "get_algorithm", "register_algorithm"]

"""pytest plugin (``-p _modelopt_alias``): ``modelopt.torch.quantization[.X]`` imports ``quant_core[.X]``.

The rest of ModelOpt (``modelopt.torch.opt``, ``utils``, ``export``, ...) stays ModelOpt's own, so
ModelOpt's unit tests run against quant-core exactly as a user's code does after changing the one
import line; a ModelOpt quantization path or name quant-core lacks fails to import, as it would
for them (and takes the whole test file with it when the file imports it at the top).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

PREFIX = "modelopt.torch.quantization"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already-imported quant_core module under the ModelOpt name."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the quant_core module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ModelOpt quantization module names to quant_core's when quant_core has them."""

    def find_spec(self, name: str, path: object, target: object = None):
        if name != PREFIX and not name.startswith(PREFIX + "."):
            return None
        real = "quant_core" + name[len(PREFIX) :]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ModuleNotFoundError:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader(real))


sys.meta_path.insert(0, _AliasFinder())

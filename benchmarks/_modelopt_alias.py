"""pytest plugin (``-p _modelopt_alias``): ``modelopt.torch.quantization[.X]`` imports ``quant_core[.X]``.

The rest of ModelOpt (``modelopt.torch.opt``, ``utils``, ``export``, ...) stays ModelOpt's own, so
ModelOpt's unit tests run against quant-core exactly as a user's code does after changing the one
import line; a ModelOpt quantization path quant-core lacks fails to import, as it would for them.
With ``MODELOPT_ALIAS=top`` only the package itself (``import modelopt.torch.quantization as mtq``)
is quant-core's and its submodules stay ModelOpt's (a looser measure: tests that reach into
submodules then mix the two).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

PREFIX = "modelopt.torch.quantization"
TOP_ONLY = os.environ.get("MODELOPT_ALIAS", "package") == "top"


def _modelopt_quantization_dir() -> str:
    root = importlib.util.find_spec("modelopt").submodule_search_locations[0]
    return os.path.join(root, "torch", "quantization")


class _Package(ModuleType):
    """``modelopt.torch.quantization`` whose attributes are quant_core's (top mode)."""

    def __getattr__(self, attr: str) -> object:
        return getattr(self.__dict__["_target"], attr)


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already-imported quant_core module under the ModelOpt name."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        if not TOP_ONLY:
            return module
        # quant_core's names, ModelOpt's submodules (``from ... import backends`` finds ModelOpt's)
        package = _Package(spec.name)
        package.__path__ = [_modelopt_quantization_dir()]
        package._target = module
        return package

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the quant_core module is already executed."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ModelOpt quantization module names to quant_core's when quant_core has them."""

    def find_spec(self, name: str, path: object, target: object = None):
        if name != PREFIX and not name.startswith(PREFIX + "."):
            return None
        if TOP_ONLY and name != PREFIX:
            if name.count(".") != PREFIX.count(".") + 1:
                return None  # below a ModelOpt submodule: the normal import finds it
            return importlib.machinery.PathFinder.find_spec(name, [_modelopt_quantization_dir()])
        real = "quant_core" + name[len(PREFIX) :]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ModuleNotFoundError:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader(real))


sys.meta_path.insert(0, _AliasFinder())

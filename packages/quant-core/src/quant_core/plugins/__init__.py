"""Plugins: higher layers hook into quant-core through the ``quant_core.plugins`` entry-point group.

Each entry point is a zero-argument callable, run once, lazily, before the first ``quantize`` or
registry lookup (quant-llm registers its Hugging Face and Megatron modules there). A plugin may
also add a model hook (:func:`register_model_hook`), run on each model that ``quantize`` or
``restore_quantizer_state`` is about to convert, to map classes it finds only then. Features that
live in a higher layer (``auto_quantize``) are published with :func:`register_feature` and raise an
``ImportError`` naming the package to install when it is absent.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

GROUP = "quant_core.plugins"
_loaded = False
_lock = threading.RLock()
_features: dict[str, Callable[..., Any]] = {}
_FEATURE_PACKAGES = {
    "auto_quantize": "quant-llm",
    "get_auto_quantize_config": "quant-llm",
    "plot_sensitivity": "quant-llm",
    "plugins.huggingface": "quant-llm",
}
_failures: dict[str, str] = {}
_model_hooks: list[Callable[[Any], Any]] = []


def load_plugins() -> None:
    """Run every ``quant_core.plugins`` entry point once (later calls do nothing)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        _loaded = True
        for ep in entry_points(group=GROUP):
            try:
                ep.load()()
            except Exception as err:  # a broken plugin must not take quant-core down with it
                _failures[ep.name] = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"quant_core plugin {ep.name!r} ({ep.value}) failed to load and is unavailable: {err}",
                    RuntimeWarning,
                    stacklevel=3,
                )


def register_model_hook(fn: Callable[[Any], Any]) -> None:
    """Run ``fn(model)`` on every model before quant-core converts its modules (added once per function)."""
    if fn not in _model_hooks:
        _model_hooks.append(fn)


def prepare_model(model: Any) -> None:
    """Load the plugins, then run every model hook on ``model`` (called by quantize and restore)."""
    load_plugins()
    for fn in list(_model_hooks):
        fn(model)


def register_feature(name: str, fn: Callable[..., Any]) -> None:
    """Publish a higher-layer feature (e.g. ``auto_quantize``) under ``quant_core``'s API."""
    _features[name] = fn


def get_feature(name: str) -> Callable[..., Any]:
    """The feature registered as ``name``, or an ImportError naming the package that provides it."""
    load_plugins()
    if name in _features:
        return _features[name]
    package = _FEATURE_PACKAGES.get(name, "the package that provides it")
    failed = f" (plugins that failed to load: {_failures})" if _failures else ""
    try:
        installed = version(package)
    except PackageNotFoundError:
        raise ImportError(
            f"mtq.{name} is provided by {package}, which is not installed: pip install {package}{failed}"
        ) from None
    raise ImportError(f"mtq.{name} is not provided by the installed {package} {installed}{failed}")


def auto_quantize(*args: Any, **kwargs: Any) -> Any:
    """Search a per-layer mix of formats (provided by quant-llm; see its documentation)."""
    return get_feature("auto_quantize")(*args, **kwargs)


def get_auto_quantize_config(*args: Any, **kwargs: Any) -> Any:
    """The replay config of an auto_quantize search state (provided by quant-llm)."""
    return get_feature("get_auto_quantize_config")(*args, **kwargs)


def plot_sensitivity(*args: Any, **kwargs: Any) -> Any:
    """Write a PNG of an auto_quantize search's scores (provided by quant-llm)."""
    return get_feature("plot_sensitivity")(*args, **kwargs)

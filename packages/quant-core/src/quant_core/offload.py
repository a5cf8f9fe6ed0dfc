"""Calibration of models dispatched by accelerate with CPU or disk offload.

accelerate keeps an offloaded module's weights on the ``meta`` device and loads them (from a CPU
state dict or from ``.dat`` files in the offload folder) only around each forward call. The
calibration algorithms also read, and GPTQ / AWQ / SmoothQuant rewrite, weights outside a
forward call: :func:`weights_materialized` loads the weights of the offloaded modules under a
module for the duration of a block and writes the changed ones back where accelerate reads them.

accelerate is not imported here: its hooks are recognized by their attributes (``_hf_hook``,
``offload``, ``weights_map``), so quant-core works without it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["has_offloaded_weights", "weights_materialized"]


def _offload_hook(module: nn.Module) -> Any:
    """The accelerate hook that offloads ``module``'s own weights, or None."""
    hooks = [getattr(module, "_hf_hook", None)]
    while hooks:
        hook = hooks.pop()
        if hook is None:
            continue
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
        hooks.extend(getattr(hook, "hooks", ()))  # accelerate's SequentialHook
    return None


def has_offloaded_weights(model: nn.Module) -> bool:
    """Whether any module of ``model`` has weights offloaded by an accelerate hook."""
    return any(_offload_hook(m) is not None for m in model.modules())


@contextmanager
def weights_materialized(module: nn.Module) -> Iterator[None]:
    """Within the block, every accelerate-offloaded weight under ``module`` is a real tensor.

    On exit, weights changed in the block (replaced or modified in place) are written back to
    the offload storage (the CPU state dict, or the ``.dat`` file in the offload folder, replaced
    atomically), then the weights go back to ``meta``. Modules that are not offloaded are
    untouched.
    """
    loaded: list[tuple[nn.Module, Any, dict[str, tuple[int, int]]]] = []
    try:
        for sub in module.modules():
            hook = _offload_hook(sub)
            if hook is None or not any(p.is_meta for p in sub.parameters(recurse=False)):
                continue
            hook.pre_forward(sub)
            hook.offload = False  # forward calls inside the block keep the weights
            loaded.append((sub, hook, _versions(sub)))
        yield
    finally:
        for sub, hook, versions in reversed(loaded):
            hook.offload = True
            now = _versions(sub)
            for name, param in sub.named_parameters(recurse=False):
                if name in now and versions.get(name) != now[name]:
                    _write_back(hook.weights_map, name, param.detach())
            hook.post_forward(sub, None)


def _versions(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """What tells a weight was replaced or changed in place: identity, version counter, storage."""
    return {
        n: (id(p), p._version, p.data_ptr())
        for n, p in module.named_parameters(recurse=False)
        if not p.is_meta
    }


def _write_back(weights_map: Any, name: str, tensor: torch.Tensor) -> None:
    """Store ``tensor`` as ``name`` where the hook's next ``pre_forward`` will read it."""
    loader, key = weights_map, name
    if hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # PrefixedDataset
        loader, key = weights_map.dataset, weights_map.prefix + name
    state = getattr(loader, "state_dict", None)
    index = getattr(loader, "index", None) or {}
    info = index.get(key)
    on_disk = state is not None and key not in state and info is not None
    if on_disk and info.get("safetensors_file") is None:
        _write_dat(os.path.join(loader.save_folder, f"{key}.dat"), tensor, info)
        return
    if on_disk:
        warnings.warn(
            f"{key} is offloaded straight from the model's safetensors file, which is never "
            "rewritten: its calibrated value is kept in CPU memory instead",
            RuntimeWarning,
            stacklevel=3,
        )
    target = state if state is not None else loader
    stored = target.get(key, tensor)
    target[key] = tensor.to(stored.device, stored.dtype)


_NUMPY_VIEWS = {"bfloat16": torch.int16, "float8_e4m3fn": torch.int8, "float8_e5m2": torch.int8}
"""accelerate stores the dtypes NumPy lacks as integers of the same width."""


def _write_dat(path: str, tensor: torch.Tensor, info: dict[str, Any]) -> None:
    """Rewrite accelerate's memory-mapped ``.dat`` file at ``path`` (same dtype and shape),
    through a temporary file in the same folder and an atomic rename."""
    import numpy as np

    dtype = info["dtype"]
    value = tensor.to("cpu", getattr(torch, dtype))
    if dtype in _NUMPY_VIEWS:
        value = value.view(_NUMPY_VIEWS[dtype])
    array = value.numpy().reshape(tuple(info["shape"]) or (1,))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".dat.tmp")
    os.close(fd)
    try:
        out = np.memmap(tmp, dtype=array.dtype, mode="w+", shape=array.shape)
        out[:] = array
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

"""A guard that fails on any read of tensor values by the host (what waits for the device on CUDA).

`no_host_reads` raises at the first ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``.numpy()``, ``aten._local_scalar_dense``, op with a data-dependent output shape
(``nonzero``, boolean indexing, ``masked_select``, ``unique``), or copy from a device to the CPU
made while it is active. On CUDA each of these is a device synchronisation; on CPU the guard proves
the same property of the code without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_HOST_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}
_DATA_DEPENDENT_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "is_nonzero",
    "equal",
    "allclose",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


class HostRead(AssertionError):
    """A tensor value was read on the host inside `no_host_reads`."""


class _Methods(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS:
            raise HostRead(f"Tensor.{name}() reads a tensor value on the host")
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _DATA_DEPENDENT_OPS:
            raise HostRead(f"{func} reads tensor values on the host")
        if name in ("index", "index_put_", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else ())
        ):
            raise HostRead(f"{func} with a boolean mask has a data-dependent shape")
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_"):
            sources = [a for a in args if isinstance(a, torch.Tensor)]
            src = sources[-1] if name == "copy_" else sources[0]
            if src.device.type not in ("cpu", "meta") and out.device.type == "cpu":
                raise HostRead(f"{func} copies from {src.device} to the CPU")
        return out


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Fail (`HostRead`) on any host read of tensor values inside the block."""
    with _Methods(), _Ops():
        yield

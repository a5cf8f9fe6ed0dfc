"""QuantModuleRegistry: which quantized class replaces which original class.

Two layers: the library's mappings (built-ins and plugins) and the user's (``mtq.register``).
A user mapping wins over a library mapping for the same class, even one registered later by a
plugin, and ``mtq.unregister`` brings the library mapping back.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType

from torch import nn


def class_key(cls: type) -> str:
    """The registry key of a class: ``nn.Linear`` for torch.nn classes, else its name."""
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return cls.__name__


class _Registry:
    """Maps original module classes to their quantized classes."""

    def __init__(self) -> None:
        self._library: dict[type, tuple[str, type]] = {}
        self._user: dict[type, tuple[str, type]] = {}

    def register(self, mapping: dict[type, str]) -> Callable[[type], type]:
        """Library decorator (ModelOpt style): ``@QuantModuleRegistry.register({nn.Linear: "nn.Linear"})``."""

        def decorator(quantized_cls: type) -> type:
            for original, key in mapping.items():
                self._library[original] = (key, quantized_cls)
            return quantized_cls

        return decorator

    def register_user(self, original_cls: type, quantized_cls: type) -> None:
        """A user mapping; it takes precedence over any library mapping of the same class."""
        if not (isinstance(original_cls, type) and issubclass(original_cls, nn.Module)):
            raise TypeError(f"original_cls must be an nn.Module subclass, got {original_cls!r}")
        if not (isinstance(quantized_cls, type) and issubclass(quantized_cls, nn.Module)):
            raise TypeError(f"quantized_cls must be an nn.Module subclass, got {quantized_cls!r}")
        if not callable(getattr(quantized_cls, "_setup", None)):
            raise TypeError(
                f"{quantized_cls.__name__} needs a _setup() method that creates its quantizers"
            )
        self._user[original_cls] = (class_key(original_cls), quantized_cls)

    def unregister(self, original_cls: type) -> None:
        """Remove the user mapping of a class (or the library one when the user has none)."""
        if original_cls in self._user:
            del self._user[original_cls]
        elif original_cls in self._library:
            del self._library[original_cls]
        else:
            raise KeyError(f"{original_cls.__name__} is not registered")

    def get(self, original_cls: type) -> type | None:
        """The quantized class for an exact original class, or None."""
        from quant_core.plugins import load_plugins

        load_plugins()
        entry = self._user.get(original_cls) or self._library.get(original_cls)
        return entry[1] if entry else None

    def get_key(self, original_cls: type) -> str:
        """The string key of a registered class (used by ``parent_class`` in configs)."""
        entry = self._user.get(original_cls) or self._library.get(original_cls)
        return entry[0] if entry else class_key(original_cls)

    def __getitem__(self, original_cls: type) -> type:
        """The quantized class for ``original_cls`` (ModelOpt's ``QuantModuleRegistry[cls]``); KeyError if none."""
        quantized = self.get(original_cls)
        if quantized is None:
            raise KeyError(
                f"{getattr(original_cls, '__name__', original_cls)!r} is not registered with "
                "QuantModuleRegistry (mtq.register(original_cls=..., quantized_cls=...) adds it)"
            )
        return quantized

    def convert(self, module: nn.Module) -> nn.Module:
        """Convert one module in place to its registered quantized class and return it (ModelOpt's
        ``QuantModuleRegistry.convert``): same object, parameters, buffers and hooks, with its
        quantizers created (at their default attributes). KeyError when its class has no mapping;
        a module that is already quantized is refused by name."""
        from quant_core.nn.tensor_quantizer import TensorQuantizer

        if not isinstance(module, nn.Module):
            raise TypeError(f"QuantModuleRegistry.convert needs an nn.Module, got {module!r}")
        if getattr(module, "_quant_original_key", None) is not None:
            raise ValueError(
                f"{type(module).__name__} is already a quantized module; convert the original"
            )
        convert_module(module, self[type(module)])
        for name, quantizer in module.named_modules():  # names for warnings and errors
            if isinstance(quantizer, TensorQuantizer):
                quantizer._name = name
        return module

    def __contains__(self, original_cls: type) -> bool:
        return self.get(original_cls) is not None

    def originals(self) -> list[type]:
        """Every original class with a mapping."""
        return list({**self._library, **self._user})

    def original_of(self, quantized_cls: type) -> type | None:
        """The original class a quantized class was registered for (user mappings first)."""
        for table in (self._user, self._library):
            for original, (_key, qcls) in table.items():
                if qcls is quantized_cls:
                    return original
        return None


QuantModuleRegistry = _Registry()


def check_forward(module: nn.Module, name: str) -> None:
    """Refuse a module whose ``forward`` was replaced on the instance (it would bypass the quantizers)."""
    if "forward" in vars(module) and not hasattr(module, "_hf_hook"):
        raise ValueError(
            f"module {name or type(module).__name__!r} ({type(module).__name__}) has its forward replaced "
            "on the instance, so its quantized forward would never run; remove the patch before "
            "quantize (accelerate hooks are supported)"
        )


def convert_module(module: nn.Module, quantized_cls: type, name: str = "") -> None:
    """Turn ``module`` into ``quantized_cls`` in place (same parameters, buffers and hooks) and set it up."""
    check_forward(module, name)
    original = type(module)
    module.__class__ = quantized_cls
    if hasattr(module, "_hf_hook") and "_old_forward" in vars(module):
        # accelerate's hook calls module._old_forward: point it at the quantized forward.
        module._old_forward = MethodType(quantized_cls.forward, module)
    module._quant_original_key = QuantModuleRegistry.get_key(original)  # type: ignore[assignment]
    module._setup()

"""KV-cache quantizers for Hugging Face attention modules that dispatch through ``ALL_ATTENTION_FUNCTIONS``.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, eager_attention_forward)(self, query, key, value, mask, ...)``
after RoPE and the cache update. quant-llm registers one attention function, ``"quant_kv"``, through
transformers' own ``AttentionInterface.register``; it applies the module's ``q_bmm_quantizer``,
``k_bmm_quantizer`` and ``v_bmm_quantizer`` and then calls the implementation the model was
configured with (eager, sdpa, flex or flash). A quantized attention module reads its config
through a view whose ``_attn_implementation`` is ``"quant_kv"``; the model's config, its mask
creation and every other module are untouched, and no forward is patched.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from quant_core.nn import QuantModule, TensorQuantizer
from quant_llm.derived_classes import quantized_subclass

KV_ATTENTION = "quant_kv"
KV_QUANTIZER_NAMES = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")


class AttentionConfigView:
    """Reads and writes through to a model config, except ``_attn_implementation``, which is ``"quant_kv"``."""

    __slots__ = ("_base",)

    def __init__(self, base: Any) -> None:
        object.__setattr__(self, "_base", base)

    @property
    def _attn_implementation(self) -> str:
        return KV_ATTENTION

    @property
    def base_attn_implementation(self) -> str:
        """The implementation the model itself is configured with (``eager`` when unset)."""
        return self._base._attn_implementation or "eager"

    def __getattr__(self, name: str) -> Any:
        if name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._base, name, value)

    def __getstate__(self) -> Any:
        return self._base

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_base", state)

    def __repr__(self) -> str:
        return f"AttentionConfigView({type(self._base).__name__}, attention={self.base_attn_implementation})"


def uses_attention_interface(cls: type) -> bool:
    """True when ``cls.forward`` dispatches through ``ALL_ATTENTION_FUNCTIONS`` (the transformers 5.x pattern)."""
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _eager_function(module: nn.Module) -> Any:
    """The model file's own ``eager_attention_forward`` (each modeling file defines its eager variant)."""
    original = module._quant_attention_original
    source = importlib.import_module(original.__module__)
    fn = getattr(source, "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"{original.__name__} runs with attn_implementation='eager' but {original.__module__} defines no "
            "eager_attention_forward; use attn_implementation='sdpa' for KV-cache quantization"
        )
    return fn


def kv_quant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize query, key and value with the module's bmm quantizers, then run the configured attention."""
    query = module.q_bmm_quantizer(query)
    key = module.k_bmm_quantizer(key)
    value = module.v_bmm_quantizer(value)
    base = module.config.base_attn_implementation
    if base == "eager":
        fn = _eager_function(module)
    else:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, None)
    return fn(module, query, key, value, attention_mask, **kwargs)


class QuantAttentionMixin(QuantModule):
    """Adds ``q/k/v_bmm_quantizer`` (disabled until a config such as FP8_KV_CFG enables them) to an attention module."""

    _quant_attention_original: type = nn.Module

    def _setup(self) -> None:
        for name in KV_QUANTIZER_NAMES:
            quantizer = TensorQuantizer()
            quantizer.disable()
            setattr(self, name, quantizer)
        if not isinstance(self.config, AttentionConfigView):
            self.config = AttentionConfigView(self.config)


def quant_attention_class(original: type) -> type:
    """The quantized class for an attention class (created once per class, named ``Quant<Name>``)."""
    return quantized_subclass(
        QuantAttentionMixin,
        original,
        __name__,
        f"{original.__name__} with KV-cache quantizers (q/k/v_bmm_quantizer).",
        _quant_attention_original=original,
    )


def register_kv_attention_function() -> None:
    """Register ``"quant_kv"`` with transformers' attention interface (idempotent)."""
    AttentionInterface.register(KV_ATTENTION, kv_quant_attention_forward)

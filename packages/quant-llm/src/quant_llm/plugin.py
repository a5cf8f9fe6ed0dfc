"""The ``quant_core.plugins`` entry point: registers quant-llm's Hugging Face modules with quant-core.

quant-core runs :func:`register` once, before its first ``quantize`` or registry lookup. It maps
GPT-2's ``Conv1D``, every transformers attention class that dispatches through
``ALL_ATTENTION_FUNCTIONS`` (adding KV-cache quantizers) and every fused-experts class
(per-expert quantizers), for the families in :data:`KNOWN_FAMILIES` and for every other
transformers modeling module already imported at that moment, and, when megatron-core is
installed (``quant-llm[nemo]``), its tensor-parallel linears. A model family imported later can
be added with :func:`register_model`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from types import ModuleType

from torch import nn

from quant_core.nn import QuantModuleRegistry

# Families whose modeling modules are imported (about 10 ms each) so their classes are always mapped.
KNOWN_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi",
    "phi3",
    "gpt2",
    "bert",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "granite",
    "starcoder2",
)
_registered: set[type] = set()


def _classes_of(module: ModuleType) -> Iterable[type]:
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and issubclass(value, nn.Module)
            and value.__module__ == module.__name__
        ):
            yield value


def register_transformers_classes(modules: Iterable[ModuleType]) -> list[str]:
    """Map the attention and fused-experts classes defined in ``modules``; returns the class names added."""
    from quant_llm.hf_attention import quant_attention_class, uses_attention_interface
    from quant_llm.hf_moe import is_fused_experts_class, quant_experts_class

    added = []
    for module in modules:
        for cls in _classes_of(module):
            if cls in _registered:
                continue
            if uses_attention_interface(cls):
                quantized = quant_attention_class(cls)
            elif is_fused_experts_class(cls):
                quantized = quant_experts_class(cls)
            else:
                continue
            QuantModuleRegistry.register({cls: cls.__name__})(quantized)
            _registered.add(cls)
            added.append(cls.__name__)
    return added


def register_model(model: nn.Module) -> list[str]:
    """Map the classes of a transformers model's own modeling module(s) (for families imported after start-up)."""
    names = {
        type(m).__module__
        for m in model.modules()
        if type(m).__module__.startswith("transformers.models.")
    }
    return register_transformers_classes(sys.modules[n] for n in sorted(names))


def _imported_modeling_modules() -> list[ModuleType]:
    return [
        mod
        for name, mod in list(sys.modules.items())
        if mod is not None and name.startswith("transformers.models.") and ".modeling_" in name
    ]


def register() -> None:
    """Register quant-llm's Hugging Face mappings with quant-core (run by the plugin entry point)."""
    from transformers.pytorch_utils import Conv1D

    from quant_llm.hf_attention import register_kv_attention_function
    from quant_llm.hf_linear import QuantConv1D

    QuantModuleRegistry.register({Conv1D: "Conv1D"})(QuantConv1D)
    register_kv_attention_function()
    for family in KNOWN_FAMILIES:
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    register_transformers_classes(_imported_modeling_modules())
    if (
        importlib.util.find_spec("megatron") is not None
        and importlib.util.find_spec("megatron.core") is not None
    ):
        importlib.import_module("quant_llm.megatron")  # registers the tensor-parallel linears

"""The ``quant_core.plugins`` entry point: registers quant-llm's modules with quant-core.

quant-core runs :func:`register` once, before its first ``quantize`` or registry lookup. It maps
GPT-2's ``Conv1D``, every transformers attention class that dispatches through
``ALL_ATTENTION_FUNCTIONS`` (adding KV-cache quantizers) and every fused-experts class
(per-expert quantizers), for the families in :data:`KNOWN_FAMILIES` and for every other
transformers modeling module already imported at that moment. It also adds a model hook,
:func:`prepare_model`, that quant-core runs on each model it quantizes or restores: it maps the
transformers families that model uses (so a family imported late needs no call), and, once the
model's code has imported them, megatron-core's tensor-parallel linears and core attention
(``quant-llm[nemo]``) and Transformer Engine's linears.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from types import ModuleType

from torch import nn

from quant_core.nn import QuantModule, QuantModuleRegistry

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
_candidates: dict[str, list[type]] = {}
"""Per scanned modeling module, its attention and fused-experts classes (the scan runs once per module)."""


def _classes_of(module: ModuleType) -> Iterable[type]:
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and issubclass(value, nn.Module)
            and value.__module__ == module.__name__
        ):
            yield value


def register_transformers_classes(modules: Iterable[ModuleType]) -> list[str]:
    """Map the attention and fused-experts classes defined in ``modules``; returns the class names added.

    Each module is scanned once; a class found there is mapped again whenever it has no mapping
    (after ``QuantModuleRegistry.unregister(cls)``, the next ``quantize`` maps it again, as
    ModelOpt's on-the-fly registration does).
    """
    from quant_llm.hf_attention import quant_attention_class, uses_attention_interface
    from quant_llm.hf_moe import is_fused_experts_class, quant_experts_class

    added = []
    mapped = set(QuantModuleRegistry.originals())
    for module in modules:
        classes = _candidates.get(module.__name__)
        if classes is None:
            classes = [
                cls
                for cls in _classes_of(module)
                if uses_attention_interface(cls) or is_fused_experts_class(cls)
            ]
            _candidates[module.__name__] = classes
        for cls in classes:
            if cls in mapped:
                continue
            if uses_attention_interface(cls):
                quantized = quant_attention_class(cls)
            else:
                quantized = quant_experts_class(cls)
            QuantModuleRegistry.register({cls: cls.__name__})(quantized)
            mapped.add(cls)
            added.append(cls.__name__)
    return added


def register_model(model: nn.Module) -> list[str]:
    """Register the quantized-module mappings for the classes of ``model``'s transformers modeling
    module(s); returns the names registered. ``quantize`` runs it on the model it is given (through
    quant-core's model hook), so calling it by hand is only needed to map classes before that."""
    names = {
        type(m).__module__
        for m in model.modules()
        if type(m).__module__.startswith("transformers.models.")
    }
    added = register_transformers_classes(sys.modules[n] for n in sorted(names))
    return added + register_special_classes(model) + register_fused_experts(model)


# transformers classes with their own quantized class (quant_llm.hf_special): (module, class name)
_SPECIAL: set[tuple[str, str]] = {
    ("transformers.models.dbrx.modeling_dbrx", "DbrxExpertGLU"),
    ("transformers.integrations.finegrained_fp8", "FP8Linear"),
}


def register_special_classes(model: nn.Module) -> list[str]:
    """Map DBRX's expert GLU and transformers' fine-grained ``FP8Linear`` when ``model`` holds them
    (see :mod:`quant_llm.hf_special`); returns the names added."""
    from quant_llm import hf_special

    added = []
    for cls in {type(m) for m in model.modules()}:
        special = (cls.__module__, cls.__name__) in _SPECIAL
        if special and QuantModuleRegistry.get(cls) is None:
            QuantModuleRegistry.register({cls: cls.__name__})(hf_special.quantized_class(cls))
            added.append(cls.__name__)
    return added


def register_fused_experts(model: nn.Module) -> list[str]:
    """Map the class of every module of ``model`` holding fused experts in 3-D parameters (any
    class, as ModelOpt's ``register_fused_experts_on_the_fly``: see
    :func:`quant_llm.hf_moe.fused_experts_layout`) that has no mapping yet; returns the names added."""
    from quant_llm.hf_moe import fused_experts_layout, quant_experts_class

    added = []
    seen: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or isinstance(module, QuantModule):
            continue
        seen.add(cls)
        if QuantModuleRegistry.get(cls) is None and fused_experts_layout(module) is not None:
            QuantModuleRegistry.register({cls: cls.__name__})(quant_experts_class(cls))
            added.append(cls.__name__)
    return added


def _imported_modeling_modules() -> list[ModuleType]:
    return [
        mod
        for name, mod in list(sys.modules.items())
        if mod is not None and name.startswith("transformers.models.") and ".modeling_" in name
    ]


def _register_parallel_layers() -> None:
    """Map megatron-core's and Transformer Engine's layers once the user's code has imported them."""
    if "megatron.core" in sys.modules:
        importlib.import_module("quant_llm.megatron")  # Column/RowParallelLinear
        importlib.import_module("quant_llm.megatron_attention")  # DotProductAttention
    if "transformer_engine" in sys.modules and _transformer_engine_importable():
        importlib.import_module("quant_llm.transformer_engine")


def _transformer_engine_importable() -> bool:
    """False when ``transformer_engine`` is only a failed or placeholder import (megatron tolerates its absence)."""
    try:
        return importlib.util.find_spec("transformer_engine.pytorch") is not None
    except (ImportError, ValueError):
        return False


def prepare_model(model: nn.Module) -> None:
    """Model hook run by quant-core before it converts ``model``: map the classes this model needs."""
    register_model(model)
    _register_parallel_layers()


def register() -> None:
    """Register quant-llm's mappings and its model hook with quant-core (run by the plugin entry point)."""
    from transformers.pytorch_utils import Conv1D

    from quant_core.plugins import register_feature, register_model_hook
    from quant_llm.hf_attention import register_kv_attention_function
    from quant_llm.hf_linear import QuantConv1D

    QuantModuleRegistry.register({Conv1D: "Conv1D"})(QuantConv1D)
    register_kv_attention_function()
    for family in KNOWN_FAMILIES:
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    register_transformers_classes(_imported_modeling_modules())
    _register_parallel_layers()
    register_model_hook(prepare_model)
    register_feature("plugins.huggingface", huggingface_names)
    from quant_llm import auto_quantize as aq

    for name in ("auto_quantize", "get_auto_quantize_config", "plot_sensitivity"):
        register_feature(name, getattr(aq, name))


def huggingface_names() -> dict[str, object]:
    """quant-llm's objects under ModelOpt's ``quantization.plugins.huggingface`` names."""
    from quant_llm.hf_attention import QuantAttentionMixin, quant_attention_class
    from quant_llm.hf_linear import QuantConv1D
    from quant_llm.hf_moe import (
        QuantFusedExperts,
        force_eager_experts_impl_on_the_fly,
        quant_experts_class,
    )

    return {
        # ModelOpt's per-kind "map this model's classes" hooks; register_model maps them all.
        "register_hf_attentions_on_the_fly": register_model,
        "register_sparse_moe_on_the_fly": register_model,
        "register_fused_experts_on_the_fly": register_model,
        "QuantConv1D": QuantConv1D,
        "QuantAttentionMixin": QuantAttentionMixin,
        "QuantFusedExperts": QuantFusedExperts,
        "quant_attention_class": quant_attention_class,
        "quant_experts_class": quant_experts_class,
        "force_eager_experts_impl_on_the_fly": force_eager_experts_impl_on_the_fly,
    }

"""The quant_core.plugins entry point and model hook: quantizing needs no quant_llm import or call.

One fresh interpreter (import order matters) runs three steps: a GPT-2 quantized with nothing but
``import quant_core``; then a family outside KNOWN_FAMILIES imported only after the plugins have
loaded; then megatron-core imported after that.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

SCRIPT = """
import importlib.util, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
import quant_core as mtq
from quant_core.nn import QuantModuleRegistry
assert "quant_llm" not in sys.modules
config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
model = AutoModelForCausalLM.from_config(config)
ids = torch.arange(16).view(1, 16)
KV_ONLY = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *mtq.FP8_KV_CFG["quant_cfg"]]}
mtq.quantize(model, KV_ONLY, lambda m: m(input_ids=ids))  # the plugins load here
attn = model.transformer.h[0].attn
print(type(model.transformer.h[0].mlp.c_fc).__name__, type(attn).__name__, float(attn.k_bmm_quantizer.amax) > 0)

assert "transformers.models.cohere.modeling_cohere" not in sys.modules
assert "megatron.core" not in sys.modules
config = AutoConfig.for_model(
    "cohere", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
)
model = AutoModelForCausalLM.from_config(config)
mtq.quantize(model, KV_ONLY, lambda m: m(input_ids=ids))
attn = model.model.layers[0].self_attn
print(type(attn).__name__, float(attn.k_bmm_quantizer.amax) > 0, "quant_llm.megatron" in sys.modules)

if importlib.util.find_spec("megatron") and importlib.util.find_spec("megatron.core"):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    mtq.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), mtq.INT8_WEIGHT_ONLY_CFG, None)
    print(QuantModuleRegistry.get(ColumnParallelLinear).__name__, QuantModuleRegistry.get(DotProductAttention).__name__)
"""


@pytest.fixture(scope="module")
def fresh_interpreter(request, tmp_path_factory) -> list[list[str]]:
    """The words of each line SCRIPT prints in a fresh interpreter (run once per session)."""
    from _session import once_per_session

    def run(folder: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            capture_output=True,
            text=True,
            timeout=300,
            env={
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",
                "TQDM_DISABLE": "1",
                "PATH": "/usr/bin:/bin",
            },
        )
        (folder / "stdout").write_text(result.stdout)
        (folder / "stderr").write_text(f"exit {result.returncode}\n{result.stderr[-2000:]}")

    folder = once_per_session(request, tmp_path_factory, "plugin_fresh_interpreter", run)
    stderr = (folder / "stderr").read_text()
    assert stderr.startswith("exit 0"), stderr
    return [line.split() for line in (folder / "stdout").read_text().splitlines()]


def test_entry_point_is_declared():
    names = {ep.value for ep in entry_points(group="quant_core.plugins")}
    assert "quant_llm.plugin:register" in names


def test_quantize_maps_hf_modules_with_no_quant_llm_import(fresh_interpreter):
    assert fresh_interpreter[0] == ["QuantConv1D", "QuantGPT2Attention", "True"]


def test_a_family_imported_after_the_plugins_loaded_is_mapped_at_quantize_time(fresh_interpreter):
    """No register_model call: quantize maps the classes of the model it is given."""
    assert fresh_interpreter[1] == ["QuantCohereAttention", "True", "False"]


def test_megatron_imported_after_the_plugins_loaded_is_mapped_by_the_next_quantize(
    fresh_interpreter,
):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    assert fresh_interpreter[2] == ["QuantColumnParallelLinear", "QuantDotProductAttention"]


def test_register_model_maps_a_family_outside_the_known_list(forward_loop):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import quant_core as mtq
    from quant_core.nn import QuantModuleRegistry
    from quant_llm import register_model
    from quant_llm.plugin import KNOWN_FAMILIES

    assert "cohere" not in KNOWN_FAMILIES
    config = AutoConfig.for_model(
        "cohere",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    attention_cls = type(model.model.layers[0].self_attn)
    register_model(model)
    assert QuantModuleRegistry.get(attention_cls) is not None
    kv_only = {"quant_cfg": [*mtq.config._base_disable_all, *mtq.FP8_KV_CFG["quant_cfg"]]}
    mtq.quantize(model, kv_only, forward_loop)
    assert model.model.layers[0].self_attn.k_bmm_quantizer.amax.item() > 0


def test_an_unregistered_attention_class_is_mapped_again_by_the_next_quantize(forward_loop):
    """As ModelOpt's on-the-fly registration: ``unregister`` does not leave the class unmapped for
    good (before, the plugin's scan cache skipped its module forever)."""
    import quant_core as mtq
    from quant_core.nn import QuantModuleRegistry
    from quant_llm.testing.tiny_models import tiny_model

    model = tiny_model("llama", "sdpa")
    attention_cls = type(model.model.layers[0].self_attn)
    assert QuantModuleRegistry.get(attention_cls) is not None
    QuantModuleRegistry.unregister(attention_cls)
    assert attention_cls not in QuantModuleRegistry.originals()
    kv_only = {"quant_cfg": [*mtq.config._base_disable_all, *mtq.FP8_KV_CFG["quant_cfg"]]}
    mtq.quantize(model, kv_only, forward_loop)
    assert QuantModuleRegistry.get(attention_cls) is not None
    attention = model.model.layers[0].self_attn
    assert type(attention).__name__ == f"Quant{attention_cls.__name__}"
    assert attention.k_bmm_quantizer.amax.item() > 0

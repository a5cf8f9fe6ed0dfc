"""Transformer Engine linears: registration is skipped cleanly without TE; the real thing needs TE and CUDA.

Transformer Engine cannot be installed on the CPU machines this project is developed on, so the
quantized TE classes have never run here; the ``gpu`` test below exercises them where TE is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from _megatron_cpu import HAVE_MEGATRON

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(HAVE_TE, reason="checks the behaviour without Transformer Engine")
def test_without_transformer_engine_quantize_skips_its_registration_cleanly(recwarn):
    import quant_core as mtq
    from quant_core.nn import QuantModuleRegistry

    if HAVE_MEGATRON:
        # megatron tolerates a missing TE by putting MagicMock placeholders in its place
        importlib.import_module("megatron.core.extensions.transformer_engine")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(2, 8)))
    assert type(model[0]).__name__ == "QuantLinear"
    assert "quant_llm.transformer_engine" not in sys.modules
    keys = [QuantModuleRegistry.get_key(c) for c in QuantModuleRegistry.originals()]
    assert not [k for k in keys if k.startswith(("te_", "TE"))]
    assert not [w for w in recwarn if "plugin" in str(w.message)]


@pytest.mark.skipif(HAVE_TE, reason="checks the behaviour without Transformer Engine")
def test_asking_for_transformer_engine_support_without_it_names_the_pip_install():
    with pytest.raises(ImportError, match=r"pip install 'transformer-engine\[pytorch\]'"):
        importlib.import_module("quant_llm.transformer_engine")


def _int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.double().abs().amax(dim=1, keepdim=True) / 127.0
    return torch.round(w.double() / scale).clamp(-128, 127) * scale


def _int8_per_tensor(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = amax / 127.0
    return torch.round(x.double() / scale).clamp(-128, 127) * scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine needs a CUDA device")
def test_te_linear_and_layernorm_linear_quantize_like_a_float64_reference():
    te = pytest.importorskip("transformer_engine.pytorch")
    import quant_core as mtq

    torch.manual_seed(0)
    x = torch.randn(16, 64, device="cuda")
    linear = te.Linear(64, 32, params_dtype=torch.float32).cuda().eval()
    mtq.quantize(linear, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    assert type(linear).__name__ == "QuantTELinear"
    assert linear.input_quantizer.amax.item() == x.abs().max().item()
    with torch.no_grad():
        out = linear(x).double()
    expected = _int8_per_tensor(x, x.abs().max().item()) @ _int8_per_channel(linear.weight).T
    torch.testing.assert_close(out, expected + linear.bias.double(), rtol=5e-3, atol=5e-3)

    ln_linear = te.LayerNormLinear(64, 32, params_dtype=torch.float32).cuda().eval()
    mtq.quantize(ln_linear, mtq.INT8_WEIGHT_ONLY_CFG, None)
    assert type(ln_linear).__name__ == "QuantTELayerNormLinear"
    with torch.no_grad():
        out = ln_linear(x).double()
    normed = torch.nn.functional.layer_norm(
        x.double(), (64,), ln_linear.layer_norm_weight.double(), ln_linear.layer_norm_bias.double()
    )
    expected = normed @ _int8_per_channel(ln_linear.weight).T + ln_linear.bias.double()
    torch.testing.assert_close(out, expected, rtol=5e-3, atol=5e-3)

    ln_linear.input_quantizer.enable()
    with pytest.raises(NotImplementedError, match="parent_class"):
        ln_linear(x)

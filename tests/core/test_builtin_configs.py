"""Every built-in config quantizes a small CNN and a tiny Llama (built from a config) on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from core_models import make_tiny_llama

import quant_core as mtq
from quant_core.conversion import iter_quantizers

ALL = sorted(mtq.choices)
KV_ONLY = {
    "FP8_KV_CFG",
    "FP8_AFFINE_KV_CFG",
    "NVFP4_KV_CFG",
    "NVFP4_AFFINE_KV_CFG",
    "NVFP4_KV_ROTATE_CFG",
}
# Configs that select modules by name (MLP, experts, o_proj): nothing matches in the CNN. On the
# tiny Llama: a quantizer they enable (None: nothing, it has no experts) and whether q_proj's is.
BY_NAME = {
    "NVFP4_MLP_WEIGHT_ONLY_CFG": "mlp.down_proj.weight_quantizer",
    "MXFP4_MLP_WEIGHT_ONLY_CFG": "mlp.down_proj.weight_quantizer",
    "NVFP4_MLP_ONLY_CFG": "mlp.down_proj.input_quantizer",
    "NVFP4_OMLP_ONLY_CFG": "self_attn.o_proj.weight_quantizer",
    "NVFP4_EXPERTS_ONLY_CFG": None,
}
# Mamba-MoE presets quantize everything but the attention projections.
NO_ATTENTION = {n for n in mtq.choices if n.startswith("MAMBA_MOE_")}


def config_for(name: str) -> dict:
    """The built-in config; a KV config (ModelOpt 0.47's shape: KV entries only) after disable-all."""
    cfg = getattr(mtq, name)
    if name in KV_ONLY:
        return {"quant_cfg": [*mtq.config._base_disable_all, *cfg["quant_cfg"]], "algorithm": "max"}
    return cfg


def enabled_names(model: torch.nn.Module) -> list[str]:
    return [name for name, q, _p in iter_quantizers(model) if q.is_enabled]


@pytest.mark.parametrize("name", ALL)
def test_builtin_config_quantizes_small_cnn(name, cnn, images):
    reference = cnn(images[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # KV-only configs enable nothing in a CNN
        model = mtq.quantize(cnn, config_for(name), lambda m: [m(x) for x in images])
    out = model(images[0])
    assert torch.isfinite(out).all()
    enabled = enabled_names(model)
    assert not any(n.startswith("bn1") for n in enabled)
    if name in KV_ONLY or name in BY_NAME:
        assert enabled == [] and torch.equal(out, reference)
    else:
        assert enabled and not torch.equal(out, reference)
        assert all(
            q.amax is not None or q.is_dynamic
            for n, q in model.named_modules()
            if n in enabled and hasattr(q, "is_dynamic")
        )


@pytest.mark.parametrize("name", ALL)
def test_builtin_config_quantizes_tiny_llama(name):
    model = make_tiny_llama()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(2)]
    with torch.no_grad():
        reference = model(batches[0]).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mtq.quantize(model, config_for(name), lambda m: [m(b) for b in batches])
    with torch.no_grad():
        logits = model(batches[0]).logits
    assert torch.isfinite(logits).all()
    enabled = enabled_names(model)
    assert not any("lm_head" in n or "embed" in n for n in enabled)
    if name in BY_NAME:
        expected = BY_NAME[name]
        assert not any("q_proj" in n for n in enabled)
        if expected is None:
            assert enabled == [] and torch.equal(logits, reference)
            return
        assert any(n.endswith(expected) for n in enabled)
    elif name in NO_ATTENTION:
        assert not any("self_attn" in n for n in enabled)
        assert any(n.endswith("mlp.down_proj.weight_quantizer") for n in enabled)
    if name not in KV_ONLY:
        if name not in BY_NAME and name not in NO_ATTENTION:
            assert any(n.endswith("q_proj.weight_quantizer") for n in enabled)
        assert not torch.equal(logits, reference)
        cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
        assert cosine > 0.9

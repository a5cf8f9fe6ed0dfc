"""Every built-in config quantizes a small CNN and a tiny Llama (built from a config) on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from core_models import make_tiny_llama

import quant_core as mtq
from quant_core.conversion import iter_quantizers

ALL = sorted(mtq.choices)
KV_ONLY = {"FP8_KV_CFG", "FP8_AFFINE_KV_CFG", "NVFP4_KV_CFG", "NVFP4_KV_ROTATE_CFG"}


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
    if name in KV_ONLY:
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
    if name not in KV_ONLY:
        assert any(n.endswith("q_proj.weight_quantizer") for n in enabled)
        assert not torch.equal(logits, reference)
        cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
        assert cosine > 0.9

"""Folded rotations: the float model's logits stay the same, the weights really change, misuse is refused."""

from __future__ import annotations

import pytest
import torch

import quant_core as mtq
from quant_llm.rotation import random_hadamard, rotate_model
from quant_llm.testing.tiny_models import random_token_batches, tiny_model


@pytest.mark.parametrize("n", [64, 576, 12])
def test_random_hadamard_is_orthogonal_and_spreads_every_channel(n):
    q = random_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # a one-hot channel (an outlier) is spread: no output keeps more than half of it
    assert float(q.abs().max()) < 0.75


def test_random_hadamard_of_a_power_of_two_is_a_signed_sylvester_matrix():
    from scipy.linalg import hadamard

    q = random_hadamard(64, seed=4)
    ref = torch.from_numpy(hadamard(64)).double() / 8
    torch.testing.assert_close(q.abs(), ref.abs(), rtol=0, atol=1e-15)
    signs = (q / ref)[:, :1]  # one sign per row
    torch.testing.assert_close(q, signs * ref, rtol=0, atol=1e-15)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotated_model_has_the_same_logits(family):
    model = tiny_model(family, seed=1)
    with torch.no_grad():  # non-trivial norm scales, so that folding them matters
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
    batch = random_token_batches(batches=1)[0]
    with torch.no_grad():
        ref = model(**batch).logits
        before = model.model.layers[0].self_attn.v_proj.weight.clone()
        rotate_model(model, seed=2)
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, before, atol=1e-3)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_rotate_model_refuses_unsupported_and_quantized_models():
    with pytest.raises(ValueError, match="gemma"):
        rotate_model(tiny_model("gemma"))
    model = tiny_model("llama")
    mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG, None)
    with pytest.raises(ValueError, match="before mtq"):
        rotate_model(model)

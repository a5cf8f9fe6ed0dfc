"""Save/restore of quantized Hugging Face models with quant-core, then generate() on the restored model."""

from __future__ import annotations

import pytest
import torch

import quant_core as mtq
from quant_llm import with_kv_cache
from quant_llm.testing.tiny_models import tiny_model

CONFIG = with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_restored_model_matches_bit_for_bit_and_generates(
    family, forward_loop, calib_batches, tmp_path
):
    model = tiny_model(family)
    mtq.quantize(model, CONFIG, forward_loop)
    path = tmp_path / "quantized.safetensors"
    mtq.save(model, path)

    restored = mtq.restore(tiny_model(family, seed=1), path)
    assert type(restored.get_submodule(_attention_name(family))).__name__.startswith("Quant")
    batch = calib_batches[0]
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    prompt = batch["input_ids"][:1, :5]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = restored.generate(prompt, **kwargs)
    assert out.shape == (1, 11)
    torch.testing.assert_close(out, model.generate(prompt, **kwargs))
    # The cache path (one token at a time) gives the same greedy tokens as full recomputation.
    ids = prompt
    for _ in range(6):
        with torch.no_grad():
            next_id = restored(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    torch.testing.assert_close(out, ids)


def _attention_name(family: str) -> str:
    return "transformer.h.0.attn" if family == "gpt2" else "model.layers.0.self_attn"


def test_gpt2_conv1d_keeps_hugging_face_layout_in_state_dict(forward_loop):
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    storage = c_attn.weight.data_ptr()
    hf_weight = c_attn.weight.detach().clone()  # (in, out)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)
    assert c_attn.weight.shape == (hf_weight.shape[1], hf_weight.shape[0])  # nn.Linear layout now
    assert c_attn.weight.data_ptr() == storage  # a transposed view of the same storage, no copy
    state = model.state_dict()
    torch.testing.assert_close(
        state["transformer.h.0.attn.c_attn.weight"], hf_weight, rtol=0, atol=0
    )
    # Per-channel INT8 weight amax is per *output* channel: max |W| over each column of the HF weight.
    amax = c_attn.weight_quantizer.amax.flatten()
    torch.testing.assert_close(amax, hf_weight.abs().amax(dim=0), rtol=0, atol=0)

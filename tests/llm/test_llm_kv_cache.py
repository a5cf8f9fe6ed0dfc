"""KV-cache quantization: calibrated key/value amax are the real maxima, and attention sees quantized K and V."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import quant_core as mtq
from quant_llm import INT8_KV_CFG
from quant_llm.testing.tiny_models import tiny_model

E4M3_MAX = 448.0


def kv_only(config: dict) -> dict:
    """A KV config (ModelOpt 0.47's shape: its KV entries only) applied after disable-all: the KV cache alone."""
    return {
        "quant_cfg": [*mtq.config._base_disable_all, *config["quant_cfg"]],
        "algorithm": config.get("algorithm", "max"),
    }


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "k_bmm_quantizer")]


def _cache_maxima(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> list[tuple[float, float]]:
    """Max |key| and |value| per layer, read from the fp32 model's own KV cache (post-RoPE keys)."""
    maxima: list[tuple[float, float]] = []
    with torch.no_grad():
        for batch in batches:
            cache = model(**batch, use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                k, v = layer.keys.abs().max().item(), layer.values.abs().max().item()
                if i < len(maxima):
                    maxima[i] = (max(maxima[i][0], k), max(maxima[i][1], v))
                else:
                    maxima.append((k, v))
    return maxima


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_calibrated_kv_amax_is_the_max_of_the_keys_and_values_in_the_cache(
    family, attn, calib_batches, forward_loop
):
    model = tiny_model(family, attn)
    expected = _cache_maxima(model, calib_batches)
    mtq.quantize(model, kv_only(mtq.FP8_KV_CFG), forward_loop)
    attention = _attention_modules(model)
    assert len(attention) == len(expected) == model.config.num_hidden_layers
    for module, (k_max, v_max) in zip(attention, expected):
        # one scale for keys and values, the larger (TensorRT-LLM's kv_cache_scaling_factor;
        # quant_core.make_deployable), from real, distinct statistics, not a default
        shared = max(k_max, v_max)
        assert module.k_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)
        assert module.v_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)
        assert k_max != pytest.approx(v_max) and k_max > 0


def _fp8_reference(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = amax / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def _int8_reference(x: torch.Tensor, amax: float) -> torch.Tensor:
    x64 = x.double()
    scale = amax / 127.0
    return (torch.round(x64 / scale).clamp(-128, 127) * scale).to(x.dtype)


@pytest.mark.parametrize(
    ("config", "reference"), [(mtq.FP8_KV_CFG, _fp8_reference), (INT8_KV_CFG, _int8_reference)]
)
def test_attention_uses_keys_and_values_quantized_like_an_independent_reference(
    config, reference, calib_batches, forward_loop, monkeypatch
):
    model = tiny_model("llama", "sdpa")
    fp32 = tiny_model("llama", "sdpa")
    mtq.quantize(model, kv_only(config), forward_loop)
    amax = {
        i: (m.k_bmm_quantizer.amax.item(), m.v_bmm_quantizer.amax.item())
        for i, m in enumerate(_attention_modules(model))
    }

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def reference_attention(module, query, key, value, mask, **kwargs):
        k_amax, v_amax = amax[module.layer_idx]
        return sdpa(module, query, reference(key, k_amax), reference(value, v_amax), mask, **kwargs)

    batch = calib_batches[1]
    with torch.no_grad():
        plain = fp32(**batch).logits
        got = model(**batch).logits
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", reference_attention)
        expected = fp32(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the quantization really changed the output


def test_nvfp4_and_affine_kv_configs_quantize_keys_and_values(forward_loop, calib_batches):
    for config in (mtq.NVFP4_KV_CFG, mtq.FP8_AFFINE_KV_CFG):
        model = tiny_model("qwen2", "eager")
        with torch.no_grad():
            before = model(**calib_batches[0]).logits
        mtq.quantize(model, kv_only(config), forward_loop)
        with torch.no_grad():
            after = model(**calib_batches[0]).logits
        for module in _attention_modules(model):
            assert module.k_bmm_quantizer.is_enabled and module.v_bmm_quantizer.is_enabled
        assert 0 < (after - before).abs().max() < 0.5 * before.abs().max()


def test_nvfp4_kv_rotate_config_rotates_queries_and_keys_like_scipy(
    calib_batches, forward_loop, monkeypatch
):
    """ModelOpt 0.47's NVFP4_KV_ROTATE_CFG: queries and keys times H / sqrt(d) (scipy's Hadamard),
    keys and values NVFP4 with the calibrated global amax; without quantization q k^T is kept."""
    import scipy.linalg

    import quant_kernels as qk

    model = tiny_model("llama", "sdpa")
    fp32 = tiny_model("llama", "sdpa")
    rotation_only = tiny_model("llama", "sdpa")
    mtq.quantize(model, kv_only(mtq.NVFP4_KV_ROTATE_CFG), forward_loop)
    rotate_cfg = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*[qk]_bmm_quantizer", "cfg": {"rotate": True}, "enable": False},
        ],
        "algorithm": None,
    }
    with pytest.warns(RuntimeWarning, match="enabled no quantizer"):  # rotation alone
        mtq.quantize(rotation_only, rotate_cfg)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    h = torch.tensor(scipy.linalg.hadamard(head_dim) / head_dim**0.5, dtype=torch.float32)
    global_amax = {
        i: (m.k_bmm_quantizer.amax, m.v_bmm_quantizer.amax)
        for i, m in enumerate(_attention_modules(model))
    }
    assert all(not m.q_bmm_quantizer.is_enabled for m in _attention_modules(model))

    def nvfp4(x, amax):
        return qk.fake_quantize(
            x, num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3), global_amax=amax
        )

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def reference_attention(module, query, key, value, mask, **kwargs):
        k_amax, v_amax = global_amax[module.layer_idx]
        return sdpa(module, query @ h, nvfp4(key @ h, k_amax), nvfp4(value, v_amax), mask, **kwargs)

    batch = calib_batches[1]
    with torch.no_grad():
        plain = fp32(**batch).logits
        rotated = rotation_only(**batch).logits
        got = model(**batch).logits
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", reference_attention)
        expected = fp32(**batch).logits
    torch.testing.assert_close(rotated, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4


def test_rotated_keys_without_rotated_queries_are_refused():
    model = tiny_model("llama", "sdpa")
    cfg = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*k_bmm_quantizer", "cfg": {"rotate": True}, "enable": False},
        ]
    }
    with pytest.raises(ValueError, match=r"rotates its keys .*q_bmm_quantizer"):
        mtq.quantize(model, {**cfg, "algorithm": None})

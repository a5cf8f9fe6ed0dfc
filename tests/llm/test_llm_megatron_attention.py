"""KV-cache quantizers on megatron-core's DotProductAttention, and mtq.save/restore of a megatron GPT, on CPU.

One rank (gloo, tensor parallel size 1) in this process; the 2-rank amax sync lives in
test_llm_megatron.py. megatron's forward runs on CPU through ``_megatron_cpu.allow_cpu_forward``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _megatron_cpu import REQUIRES_MEGATRON, tiny_config

pytestmark = REQUIRES_MEGATRON

import quant_core as mtq  # noqa: E402
from quant_core.conversion import iter_tensor_quantizers  # noqa: E402
from quant_llm import INT8_KV_CFG, with_kv_cache  # noqa: E402

E4M3_MAX = 448.0
# ModelOpt 0.47's KV configs hold only their KV entries: after disable-all they quantize the KV alone.
KV_CONFIGS = {
    name: {"quant_cfg": [*mtq.config._base_disable_all, *cfg["quant_cfg"]], "algorithm": "max"}
    for name, cfg in {
        "fp8": mtq.FP8_KV_CFG,
        "fp8_affine": mtq.FP8_AFFINE_KV_CFG,
        "nvfp4": mtq.NVFP4_KV_CFG,
        "int8": INT8_KV_CFG,
    }.items()
}


@pytest.fixture(scope="module")
def megatron_rank():
    """gloo + megatron model-parallel state for one rank (tensor parallel size 1)."""
    from _megatron_cpu import free_port, init_parallel, shutdown_parallel

    init_parallel(0, 1, free_port())
    yield
    shutdown_parallel()


@pytest.fixture
def cpu_forward(megatron_rank):
    """megatron's forward allowed on CPU for the duration of one test."""
    from _megatron_cpu import allow_cpu_forward

    undo = allow_cpu_forward()
    yield
    undo()


def _enabled(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, q in iter_tensor_quantizers(model) if q.is_enabled)


@pytest.mark.parametrize("kv", sorted(KV_CONFIGS))
def test_gpt_core_attention_gets_kv_quantizers_that_kv_configs_enable(cpu_forward, kv):
    from _megatron_cpu import build_gpt, gpt_batches, gpt_forward_loop

    gpt = build_gpt()
    mtq.quantize(gpt, KV_CONFIGS[kv], gpt_forward_loop(gpt_batches(1)))
    attention = [m for m in gpt.modules() if type(m).__name__ == "QuantDotProductAttention"]
    assert len(attention) == 2
    assert _enabled(gpt) == [
        f"decoder.layers.{i}.self_attention.core_attention.{q}_bmm_quantizer"
        for i in range(2)
        for q in "kv"
    ]
    assert all(not m.q_bmm_quantizer.is_enabled for m in attention)


def test_calibrated_kv_amax_is_the_max_of_the_keys_and_values_entering_attention(cpu_forward):
    from _megatron_cpu import build_gpt, gpt_batches, gpt_forward_loop, record_kv_maxima

    batches = gpt_batches(2)
    reference = build_gpt()
    maxima, remove = record_kv_maxima(reference)
    with torch.no_grad():
        gpt_forward_loop(batches)(reference)
    remove()

    gpt = build_gpt()
    mtq.quantize(gpt, KV_CONFIGS["fp8"], gpt_forward_loop(batches))
    for i, layer in enumerate(gpt.decoder.layers):
        attention = layer.self_attention.core_attention
        k_max, v_max = maxima[i]
        shared = max(k_max, v_max)  # keys and values share the larger (make_deployable)
        assert attention.k_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)
        assert attention.v_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)
        assert k_max > 0 and k_max != pytest.approx(v_max)  # real statistics, not a default


def _fp8(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = amax / E4M3_MAX
    return ((x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double()) * scale


def _int8(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = amax / 127.0
    return torch.round(x.double() / scale).clamp(-128, 127) * scale


def _attention64(q, k, v, mask, groups: int) -> torch.Tensor:
    """Causal GQA attention in float64 in megatron's layout ([seq, batch, heads, dim] in, [seq, batch, hidden] out)."""
    q, k, v = (
        q.double(),
        k.double().repeat_interleave(groups, 2),
        v.double().repeat_interleave(groups, 2),
    )
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(mask, -10000.0).softmax(-1)
    context = torch.einsum("bhst,tbhd->sbhd", probs, v)
    return context.reshape(q.shape[0], q.shape[1], -1)


def _standalone_attention():
    """A megatron DotProductAttention (4 heads in 2 query groups, head_dim 8) and one causal batch."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    attention = DotProductAttention(tiny_config(1), 1, AttnMaskType.causal, "self").eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 2, 4, 8, generator=g)
    k, v = 3 * torch.randn(8, 2, 2, 8, generator=g) + 1, torch.randn(8, 2, 2, 8, generator=g)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    return attention, (q, k, v, mask)


@pytest.mark.parametrize(("kv", "fake_quant"), [("fp8", _fp8), ("int8", _int8)])
def test_quantized_dot_product_attention_matches_a_float64_reference(cpu_forward, kv, fake_quant):
    attention, (q, k, v, mask) = _standalone_attention()
    mtq.quantize(attention, KV_CONFIGS[kv], lambda m: m(q, k, v, mask))
    # keys and values share the larger amax (TensorRT-LLM's one kv_cache_scaling_factor)
    k_amax = v_amax = max(k.abs().max().item(), v.abs().max().item())
    assert attention.k_bmm_quantizer.amax.item() == k_amax
    assert attention.v_bmm_quantizer.amax.item() == v_amax
    with torch.no_grad():
        out = attention(q, k, v, mask)
    expected = _attention64(q, fake_quant(k, k_amax), fake_quant(v, v_amax), mask, groups=2)
    unquantized = _attention64(q, k, v, mask, groups=2)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    assert (out.double() - unquantized).abs().max() > 1e-4  # the quantizers did change K and V


def test_affine_kv_bias_is_per_kv_head_and_channel_as_on_hugging_face_models(cpu_forward):
    """Quantizers see [batch, heads, seq, dim]: FP8_AFFINE_KV_CFG's bias averages over batch and sequence."""
    attention, (q, k, v, mask) = _standalone_attention()
    mtq.quantize(attention, KV_CONFIGS["fp8_affine"], lambda m: m(q, k, v, mask))
    bias = attention.k_bmm_quantizer._bias_value  # [1, kv heads, 1, head_dim]
    expected = k.double().mean(dim=(0, 1))  # megatron layout [seq, batch, kv heads, head_dim]
    torch.testing.assert_close(bias.double().reshape(2, 8), expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # a per-batch-row bias would break on another batch size
        assert attention(q[:, :1], k[:, :1], v[:, :1], mask).shape == (8, 1, 32)


def test_save_and_restore_a_quantized_megatron_gpt(cpu_forward, tmp_path):
    from _megatron_cpu import build_gpt, gpt_batches, gpt_forward_loop

    batches = gpt_batches(2)
    gpt = build_gpt()
    mtq.quantize(gpt, with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG), gpt_forward_loop(batches))
    extra = {k for k, v in gpt.state_dict().items() if k.endswith("_extra_state")}
    assert extra and all(gpt.state_dict()[k] is None for k in extra)  # what safetensors refused
    mtq.save(gpt, tmp_path / "gpt.safetensors")

    restored = mtq.restore(build_gpt(seed=7), tmp_path / "gpt.safetensors")
    saved = dict(iter_tensor_quantizers(gpt))
    names = _enabled(restored)
    assert names == _enabled(gpt) and len(names) == 2 * (4 * 2 + 2)  # 4 linears x (in, w) + k, v
    for name in names:
        assert torch.equal(dict(iter_tensor_quantizers(restored))[name].amax, saved[name].amax)
    ids, positions, mask = batches[0]
    with torch.no_grad():
        assert torch.equal(restored(ids, positions, mask), gpt(ids, positions, mask))
    assert all(restored.state_dict()[k] is None for k in extra)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kv_amax_on_cuda_without_cpu_adaptations(megatron_rank):
    """The same calibration as on CPU, with megatron's own CUDA scratch buffer and RNG tracker."""
    from _megatron_cpu import build_gpt, gpt_batches, gpt_forward_loop, record_kv_maxima
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    batches = [tuple(t.cuda() for t in batch) for batch in gpt_batches(2)]
    gpt = build_gpt().cuda()
    maxima, remove = record_kv_maxima(gpt)
    mtq.quantize(gpt, KV_CONFIGS["fp8"], gpt_forward_loop(batches))
    remove()
    for i, layer in enumerate(gpt.decoder.layers):
        attention = layer.self_attention.core_attention
        shared = max(maxima[i])  # keys and values share the larger (make_deployable)
        assert attention.k_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)
        assert attention.v_bmm_quantizer.amax.item() == pytest.approx(shared, rel=1e-6)

"""export_compressed_tensors: checkpoints that transformers + compressed-tensors load and run like the fake-quant model.

The consumer is real: ``AutoModelForCausalLM.from_pretrained(export_dir)`` with the
compressed-tensors package decompresses the stored codes and applies the stored activation
scales itself. Exports are float32 so that the only differences left are float32 rounding of
operations done in another order (NVFP4: block scale / global scale instead of times its
reciprocal); the tolerance is 1e-5 of the largest logit, far below one FP8/INT4 rounding step.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors import safe_open

import quant_core as mtq
from quant_core.diagnostics import QuantWarning
from quant_export import UnsupportedFormatError
from quant_export.checkpoint_check import validate
from quant_export.compressed_tensors_export import export_compressed_tensors

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
quant_llm = pytest.importorskip("quant_llm")
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

# round-to-nearest FP8 (the built-ins use gptq, slower and not what these tests are about)
FP8 = {**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"}
FP8_PC_PT = {**mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG.copy(), "algorithm": "max"}
GPTQ_INT4 = {**mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG.copy(), "algorithm": "gptq"}
NO_EXPERTS = {"quant_cfg": {"*experts*": {"enable": False}}}
# name -> (family, config, expected format)
CASES = {
    "llama_fp8": ("llama", FP8, "float-quantized"),
    "llama_fp8_pc_pt": ("llama", FP8_PC_PT, "float-quantized"),
    "llama_int8_sq": ("llama", mtq.INT8_SMOOTHQUANT_CFG, "int-quantized"),
    "llama_int4_awq": ("llama", mtq.INT4_AWQ_CFG, "pack-quantized"),
    "qwen2_int4_gptq": ("qwen2", GPTQ_INT4, "pack-quantized"),
    "llama_nvfp4": ("llama", mtq.NVFP4_DEFAULT_CFG, "nvfp4-pack-quantized"),
    "qwen2_w4a16_nvfp4": ("qwen2", mtq.W4A16_NVFP4_CFG, "nvfp4-pack-quantized"),
    "llama_nvfp4_awq": ("llama", mtq.NVFP4_AWQ_LITE_CFG, "nvfp4-pack-quantized"),
    "mixtral_fp8": ("mixtral", FP8, "float-quantized"),
}


def _model(family: str) -> torch.nn.Module:
    # 128-wide so that INT4 groups of 128 divide every input size
    return tiny_model(family, hidden_size=128, intermediate_size=256)


def _calibrate(model: torch.nn.Module, config: dict) -> None:
    batches = random_token_batches(batches=2, batch_size=2, seq_len=16)
    mtq.quantize(model, config, lambda m: [m(**b) for b in batches])


def _config(family: str, config: dict) -> dict:
    if family != "mixtral":  # fused experts are not exported: keep them float (in `ignore`)
        return config
    cfg = config.copy()
    cfg["quant_cfg"] = {**cfg["quant_cfg"], **NO_EXPERTS["quant_cfg"]}
    return cfg


@pytest.fixture
def fp32_nvfp4_unpack(monkeypatch):
    """compressed-tensors unpacks NVFP4 weights to bfloat16 by default; keep float32 models float32."""
    import compressed_tensors.compressors.nvfp4.base as nvfp4_base

    unpack = functools.partial(nvfp4_base.unpack_fp4_from_uint8, dtype=torch.float32)
    monkeypatch.setattr(nvfp4_base, "unpack_fp4_from_uint8", unpack)


def _load(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_loads_the_checkpoint_and_reproduces_the_fake_quant_logits(
    name, tmp_path, fp32_nvfp4_unpack
):
    family, config, fmt = CASES[name]
    model = _model(family)
    _calibrate(model, _config(family, config))
    path = export_compressed_tensors(model, tmp_path / "ckpt", dtype=torch.float32)
    ids = random_token_batches(batches=1, batch_size=2, seq_len=12, seed=7)[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        got = _load(path)(ids).logits
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == fmt
    assert "lm_head" in qc["ignore"]
    QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema accepts it
    assert validate(path)["layout"] == "compressed-tensors"  # quant-export validate
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    float_logits = _model(family)(ids).logits
    assert (float_logits - expected).abs().max() > 1e-3  # the quantization is visible


def test_stored_fp8_codes_and_scales_are_the_quantizer_amax_over_448(tmp_path):
    model = _model("llama")
    _calibrate(model, quant_llm.with_kv_cache(FP8, mtq.FP8_KV_CFG))
    path = export_compressed_tensors(model, tmp_path / "ckpt", dtype=torch.float32)
    attn = model.model.layers[1].self_attn
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        ws = f.get_tensor("model.layers.1.self_attn.q_proj.weight_scale")
        k_scale = f.get_tensor("model.layers.1.self_attn.k_scale")
        v_scale = f.get_tensor("model.layers.1.self_attn.v_scale")
    assert w.dtype == torch.float8_e4m3fn and ws.shape == (1,)
    assert ws.item() == pytest.approx(attn.q_proj.weight_quantizer.amax.item() / 448, rel=1e-6)
    assert k_scale.item() == pytest.approx(attn.k_bmm_quantizer.amax.item() / 448, rel=1e-6)
    assert v_scale.item() == pytest.approx(attn.v_bmm_quantizer.amax.item() / 448, rel=1e-6)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["num_bits"] == 8 and qc["kv_cache_scheme"]["type"] == "float"
    # transformers does not run compressed-tensors' KV-cache quantization (it reports the scales as
    # unexpected keys; vLLM reads them as attn.k_scale / v_scale): its logits are those of the model
    # with the KV quantizers off
    for layer in model.model.layers:
        layer.self_attn.k_bmm_quantizer.disable()
        layer.self_attn.v_bmm_quantizer.disable()
    ids = random_token_batches(batches=1, batch_size=1, seq_len=10, seed=3)[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        got = _load(path)(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def _share_scale(model: torch.nn.Module) -> None:
    """Give q/k/v and gate/up one random pre-quant scale each (weights divided by it)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                parent = layer.self_attn if group[0] == "q_proj" else layer.mlp
                s = torch.rand(128, generator=gen) * 1.5 + 0.5
                for proj in group:
                    m = getattr(parent, proj)
                    m.weight.mul_(s)
                    m.input_quantizer.pre_quant_scale = 1.0 / s


def test_folding_a_shared_scale_into_the_norm_keeps_the_outputs(tmp_path):
    model = _model("llama")
    _calibrate(model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    _share_scale(model)  # scales set by hand after calibration: the export refuses them ...
    with pytest.raises(UnsupportedFormatError, match=r"q_proj.*not folded.*make_deployable"):
        export_compressed_tensors(model, tmp_path / "refused")
    ids = random_token_batches(batches=1, batch_size=2, seq_len=12, seed=5)[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        report = mtq.make_deployable(model)  # ... until make_deployable folds them
        after = model(ids).logits
    assert report.resmoothed == []
    assert sorted(report.into_norms) == [
        f"model.layers.{i}.{n}"
        for i in (0, 1)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    assert all(m.input_quantizer.pre_quant_scale is None for m in _linears(model))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert not mtq.make_deployable(model).changed  # a second call changes nothing
    export_compressed_tensors(model, tmp_path / "ckpt", dtype=torch.float32)


def _linears(model):
    return [m for n, m in model.named_modules() if n.endswith("_proj")]


def test_different_scales_on_one_input_are_resmoothed_then_folded(tmp_path):
    model = _model("llama")
    _calibrate(model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    gen = torch.Generator().manual_seed(1)
    attn = model.model.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj"):  # one scale per layer, as ModelOpt's awq_lite
        attn.get_submodule(proj).input_quantizer.pre_quant_scale = (
            torch.rand(128, generator=gen) + 0.5
        )
    report = mtq.make_deployable(model)
    qkv = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert report.resmoothed == [qkv]
    assert report.into_norms == {"model.layers.0.input_layernorm": qkv}
    assert all(m.input_quantizer.pre_quant_scale is None for m in _linears(model))


def test_awq_lite_scales_are_folded_by_calibration_so_no_pre_quant_scale_is_stored(tmp_path):
    model = _model("llama")
    # ModelOpt's awq_lite: one scale per layer; calibration resmooths q/k/v and folds every scale
    _calibrate(model, {**mtq.INT4_AWQ_CFG.copy(), "algorithm": "awq_lite"})
    assert all(m.input_quantizer.pre_quant_scale is None for m in _linears(model))
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # the q/k/v scale lives here now
    path = export_compressed_tensors(model, tmp_path / "ckpt", dtype=torch.float32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "pre_quant_scale" in k]  # noqa: SIM118


def test_shipped_int4_awq_folds_into_norms_and_keeps_the_gptq_weights_on_the_grid(tmp_path):
    model = _model("llama")
    _calibrate(model, mtq.INT4_AWQ_CFG)  # awq_gptq: one scale per input, weights on the grid
    readers = {
        n: m
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    }
    assert all(m.input_quantizer.pre_quant_scale is None for m in readers.values())
    for name, module in readers.items():  # folding into a norm leaves the GPTQ weights as they are
        if name.endswith(("q_proj", "k_proj", "gate_proj")):  # (v/up rows take o/down's scales)
            with torch.no_grad():
                fq = module.weight_quantizer(module.weight)
            torch.testing.assert_close(fq, module.weight, rtol=0, atol=0)
    path = export_compressed_tensors(model, tmp_path / "ckpt", dtype=torch.float32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "pre_quant_scale" in k]  # noqa: SIM118


def test_unfoldable_pre_quant_scales_and_bad_groups_are_refused(tmp_path):
    model = _model("llama")
    # o_proj's scale would have to go into v_proj's rows, which the quantized V cache reads
    _calibrate(model, quant_llm.with_kv_cache(mtq.INT4_AWQ_CFG, mtq.FP8_KV_CFG))
    with pytest.raises(UnsupportedFormatError, match=r"o_proj.*not folded.*modelopt"):
        export_compressed_tensors(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model = tiny_model("llama", hidden_size=192, intermediate_size=256)
    _calibrate(model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    with pytest.raises(UnsupportedFormatError, match="192 is not divisible by group size 128"):
        export_compressed_tensors(model, tmp_path / "b")
    model = _model("llama")
    _calibrate(model, mtq.MXFP8_DEFAULT_CFG)
    with pytest.raises(UnsupportedFormatError, match="no form in the compressed-tensors"):
        export_compressed_tensors(model, tmp_path / "c")


def test_bfloat16_export_stores_scales_in_the_model_dtype(tmp_path):
    model = _model("llama")
    _calibrate(model, FP8)
    path = export_compressed_tensors(model, tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ids = random_token_batches(batches=1, batch_size=1, seq_len=8, seed=2)[0]["input_ids"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = loaded(ids).logits.float(), model(ids).logits
    # bfloat16 activations and scales: about 2^-8 relative per op, a few percent of the logits
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def _global_scales(path, names: list[str]) -> list[float]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return [f.get_tensor(f"{n}.weight_global_scale").item() for n in names]


def test_nvfp4_fused_layers_share_one_global_scale(tmp_path):
    """vLLM and SGLang run q/k/v and gate/up as one GEMM with the shards' largest
    ``weight_global_scale`` (compressed_tensors_w4a4_nvfp4.py): calibration gives each group one."""
    model = _model("llama")
    _calibrate(model, mtq.NVFP4_DEFAULT_CFG)
    layer = "model.layers.0"
    qkv = [f"{layer}.self_attn.{p}_proj" for p in "qkv"]
    own = {n: model.get_submodule(n).weight.detach().abs().max().item() for n in qkv}
    assert len(set(own.values())) > 1  # max calibration alone would leave them different
    path = export_compressed_tensors(model, tmp_path / "ckpt", torch.float32)
    scales = _global_scales(path, qkv)
    assert scales[0] == scales[1] == scales[2]
    assert scales[0] == pytest.approx(448 * 6 / max(own.values()), rel=1e-6)
    gate_up = _global_scales(path, [f"{layer}.mlp.{p}_proj" for p in ("gate", "up")])
    assert gate_up[0] == gate_up[1] != _global_scales(path, [f"{layer}.self_attn.o_proj"])[0]


def test_static_nvfp4_fused_layers_share_a_global_amax_and_keep_matching_the_model(tmp_path):
    """Per-block calibrated NVFP4 weights (awq_clip) get the group's largest global amax as
    ``TensorQuantizer.global_amax``: the files then equal the model's fake quantization."""
    from hf_decode import dequantize_hf

    from quant_export import export_hf_checkpoint

    model = _model("llama")
    _calibrate(model, mtq.NVFP4_AWQ_CLIP_CFG)  # static per-block weight amaxes
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    own = [model.get_submodule(n).weight_quantizer.amax.max().item() for n in qkv]
    assert len(set(own)) > 1
    for n in qkv:
        assert model.get_submodule(n).weight_quantizer.global_amax.item() == max(own)
    path = export_compressed_tensors(model, tmp_path / "ct", torch.float32)
    assert _global_scales(path, qkv) == [pytest.approx(448 * 6 / max(own), rel=1e-6)] * 3
    q_amax = model.get_submodule(qkv[0]).weight_quantizer
    q_amax.global_amax = q_amax.amax.max()  # one layer's own global amax, set by hand
    with pytest.warns(QuantWarning, match="vLLM, SGLang and TensorRT-LLM fuse these layers"):
        path = export_compressed_tensors(
            model, tmp_path / "per_layer", torch.float32, share_fused_scales=False
        )
    assert len(set(_global_scales(path, qkv))) > 1
    mtq.make_deployable(model)
    hf = export_hf_checkpoint(model, tmp_path / "hf", torch.float32)
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        for n in qkv:
            layer = {
                k: f.get_tensor(f"{n}.{k}") for k in ("weight", "weight_scale", "weight_scale_2")
            }
            module = model.get_submodule(n)
            with torch.no_grad():
                fq = module.weight_quantizer(module.weight).float()
            ulp = (torch.nextafter(fq.abs(), torch.tensor(float("inf"))) - fq.abs()).double()
            assert ((dequantize_hf("NVFP4", layer, 16) - fq.double()).abs() <= ulp).all()


def test_gptq_nvfp4_rounds_fused_layers_under_one_global_amax_so_export_changes_nothing(tmp_path):
    """GPTQ stacks q/k/v (and gate/up) and rounds them under the group's global amax, which it
    stores as each layer's ``global_amax``: the export's sharing then has nothing to change."""
    model = _model("llama")
    _calibrate(model, {**mtq.NVFP4_DEFAULT_CFG.copy(), "algorithm": "gptq"})
    qkv = [model.get_submodule(f"model.layers.0.self_attn.{p}_proj") for p in "qkv"]
    shared = {m.weight_quantizer.global_amax.item() for m in qkv}
    assert len(shared) == 1
    assert shared.pop() == max(m.weight_quantizer.amax.max().item() for m in qkv)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    path = export_compressed_tensors(model, tmp_path / "ct", torch.float32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert len(set(_global_scales(path, names))) == 1

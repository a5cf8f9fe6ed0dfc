"""export_tensorrt_llm_checkpoint: the files, read back by an independent reader, rebuild the fake-quant model.

The reader (``trtllm_reader.py``) merges ``rank*.safetensors`` as TensorRT-LLM's split rules say,
decodes every weight in float64 from its codes as each ``quant_algo`` means it, sets activation and
KV-cache scales from the files on a fresh model with different random weights, and must reproduce
the quantized model's logits, for every format at tensor parallel 1 and 2.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from trtllm_reader import rebuild

import quant_core as mtq
from quant_export import (
    UnsupportedFormatError,
    export_tensorrt_llm_checkpoint,
    validate_tensorrt_llm_checkpoint,
)

transformers = pytest.importorskip("transformers")
quant_llm = pytest.importorskip("quant_llm")
from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

WIDE = {"hidden_size": 256, "intermediate_size": 512}  # INT4 groups of 128 at tp 2
NARROW = {"hidden_size": 128, "intermediate_size": 256}


def _mixed_cfg() -> dict:
    """FP8 attention, INT4 AWQ MLP (what AutoQuantize produces): a MIXED_PRECISION checkpoint."""
    cfg = copy.deepcopy(dict(mtq.FP8_DEFAULT_CFG))
    cfg["quant_cfg"] = dict(cfg["quant_cfg"])
    cfg["quant_cfg"]["*mlp*weight_quantizer"] = {
        "num_bits": 4,
        "block_sizes": {-1: 128},
        "enable": True,
    }
    cfg["quant_cfg"]["*mlp*input_quantizer"] = {"enable": False}
    cfg["algorithm"] = "max"
    return cfg


# case -> (family, decoder_type, config, KV config, size overrides, expected quant_algo)
CASES = {
    "fp8": ("llama", "llama", "FP8_DEFAULT_CFG", "FP8_KV_CFG", NARROW, "FP8"),
    "fp8_per_channel": (
        "llama", "llama", "FP8_PER_CHANNEL_PER_TOKEN_CFG", None, NARROW, "FP8_PER_CHANNEL_PER_TOKEN",
    ),
    "int8_sq": ("llama", "llama", "INT8_SMOOTHQUANT_CFG", "INT8_KV_CFG", NARROW, "W8A8_SQ_PER_CHANNEL"),
    "w8a16": ("llama", "llama", "INT8_WEIGHT_ONLY_CFG", None, NARROW, "W8A16"),
    "w4a16_awq": ("llama", "llama", "INT4_AWQ_CFG", None, WIDE, "W4A16_AWQ"),
    "w4a8_awq": ("llama", "llama", "W4A8_AWQ_BETA_CFG", None, WIDE, "W4A8_AWQ"),
    "nvfp4": ("llama", "llama", "NVFP4_DEFAULT_CFG", None, NARROW, "NVFP4"),
    # static per-block NVFP4 weights: fused q/k/v and gate/up share TensorQuantizer.global_amax
    "nvfp4_static": ("llama", "llama", "NVFP4_AWQ_CLIP_CFG", None, NARROW, "NVFP4"),
    "mixed": ("llama", "llama", _mixed_cfg, "FP8_KV_CFG", WIDE, "MIXED_PRECISION"),
    "gpt2_int8_sq": ("gpt2", "gpt", "INT8_SMOOTHQUANT_CFG", "FP8_KV_CFG", {}, "W8A8_SQ_PER_CHANNEL"),
    "mixtral_fp8": ("mixtral", "llama", "FP8_DEFAULT_CFG", "FP8_KV_CFG", NARROW, "FP8"),
    "qwen2_fp8": ("qwen2", "qwen", "FP8_DEFAULT_CFG", None, NARROW, "FP8"),
    "qwen3_nvfp4": ("qwen3", "qwen", "NVFP4_DEFAULT_CFG", "FP8_KV_CFG", NARROW, "NVFP4"),
}  # fmt: skip
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _config(name: str) -> dict:
    _, _, cfg, kv = CASES[name][:4]
    cfg = cfg() if callable(cfg) else getattr(mtq, cfg)
    if kv is None:
        return cfg
    return quant_llm.with_kv_cache(cfg, getattr(mtq, kv, None) or getattr(quant_llm, kv))


class _Exports(dict):
    """case -> (model, {tp: folder}), quantized and exported on first use (per pytest-xdist worker)."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str):
        family, decoder, *_, sizes, _ = CASES[name]
        model = tiny_model(family, **sizes)
        batches = random_token_batches()
        mtq.quantize(model, _config(name), lambda m: [m(**b) for b in batches])
        folders = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # shared fused scales, announced
            for tp in (1, 2):
                folders[tp] = export_tensorrt_llm_checkpoint(
                    model,
                    decoder,
                    torch.float32,
                    self.root / f"{name}_tp{tp}",
                    inference_tensor_parallel=tp,
                )
        self[name] = (model, folders)
        return self[name]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("trtllm"))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_reader_rebuilds_the_fake_quant_logits(exports, name, tp):
    model, folders = exports[name]
    family, _, _, _, sizes, _ = CASES[name]
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        rebuilt = rebuild(folders[tp], tiny_model(family, seed=7, **sizes))(input_ids=IDS).logits
        float_model = tiny_model(family, **sizes)(input_ids=IDS).logits
    error = (rebuilt - expected).abs().max().item()
    quantization_error = (float_model - expected).abs().max().item()
    # exact up to float32 rounding (W8A16: TensorRT-LLM re-derives absmax / 127 scales at load)
    assert error <= 1e-5 * expected.abs().max().item(), (error, quantization_error)
    assert quantization_error > 1e3 * max(error, 1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_config_is_a_pretrained_config_with_the_format(exports, name):
    model, folders = exports[name]
    expected_algo = CASES[name][-1]
    hf = model.config
    cfg = validate_tensorrt_llm_checkpoint(folders[2])
    assert cfg["mapping"] == {**cfg["mapping"], "world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg["quantization"]["quant_algo"] == expected_algo
    assert cfg["num_attention_heads"] == hf.num_attention_heads
    assert cfg["vocab_size"] == hf.vocab_size and cfg["dtype"] == "float32"
    assert sorted(p.name for p in folders[2].glob("rank*")) == [
        "rank0.safetensors",
        "rank1.safetensors",
    ]
    kv = CASES[name][3]
    assert cfg["quantization"]["kv_cache_quant_algo"] == (kv and kv.split("_")[0])
    if expected_algo == "MIXED_PRECISION":
        layers = json.loads((folders[2] / "quant_cfg.json").read_text())["quantized_layers"]
        assert layers["transformer.layers.0.attention.qkv"] == {"quant_algo": "FP8"}
        assert layers["transformer.layers.1.mlp.proj"] == {
            "quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": False,
        }  # fmt: skip


def test_llama_names_shapes_and_dtypes_at_tp2(exports):
    model, folders = exports["w4a16_awq"]
    rank1 = load_file(folders[2] / "rank1.safetensors")
    hs, heads, kv_heads = 64, 4, 2  # hidden 256 / 4 heads; tiny Llama has 2 KV heads
    qkv_rows = (heads + 2 * kv_heads) * hs // 2
    assert rank1["transformer.layers.0.attention.qkv.weight"].shape == (
        qkv_rows // 2,
        256,
    )  # INT4 pairs
    assert rank1["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert rank1["transformer.layers.0.attention.qkv.weights_scaling_factor"].shape == (qkv_rows, 2)
    assert rank1["transformer.layers.0.attention.dense.weights_scaling_factor"].shape == (256, 1)
    # calibration folded the AWQ scales into input_layernorm and v_proj's rows: none is stored
    assert not [k for k in rank1 if k.endswith("prequant_scaling_factor")]
    assert rank1["transformer.layers.0.mlp.gate.weight"].shape == (128, 256)
    assert rank1["transformer.layers.0.mlp.proj.weight"].shape == (128, 256)
    assert rank1["transformer.vocab_embedding.weight"].shape == (128, 256)
    assert rank1["lm_head.weight"].shape == (128, 256)
    # rank 1's q rows are heads 2..3 of q_proj: the first packed row holds q rows 128 and 129
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(
        rank1["transformer.layers.0.attention.qkv.weights_scaling_factor"][:128],
        export_scales(q)[128:],
    )


def export_scales(layer) -> torch.Tensor:
    """INT4 group scales of a layer (block amax / 7) straight from its quantizer."""
    return (layer.weight_quantizer.amax.float() / 7).reshape(layer.weight.shape[0], -1)


def test_w8a16_layers_left_in_float_are_excluded_from_load_time_quantization(tmp_path):
    model = tiny_model("llama", **NARROW)
    cfg = copy.deepcopy(dict(mtq.INT8_WEIGHT_ONLY_CFG))
    cfg["quant_cfg"] = {**cfg["quant_cfg"], "*layers.1.mlp.down_proj*": {"enable": False}}
    mtq.quantize(model, cfg, lambda m: [m(**b) for b in random_token_batches()])
    folder = export_tensorrt_llm_checkpoint(model, "llama", torch.float32, tmp_path / "ck", 2)
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W8A16"
    assert quant["exclude_modules"] == [
        "lm_head*", "transformer.layers.1.mlp.proj*", "transformer.vocab_embedding*",
    ]  # fmt: skip
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        rebuilt = rebuild(folder, tiny_model("llama", seed=7, **NARROW))(input_ids=IDS).logits
    assert (rebuilt - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_fp8_kv_scale_is_calibrated_not_floored(exports):
    model, folders = exports["fp8"]
    scale = load_file(folders[1] / "rank0.safetensors")[
        "transformer.layers.0.attention.kv_cache_scaling_factor"
    ]
    attention = model.model.layers[0].self_attn
    amax = max(attention.k_bmm_quantizer.amax.item(), attention.v_bmm_quantizer.amax.item())
    assert scale.item() == pytest.approx(amax / 448, rel=1e-6)
    assert scale.item() < 1.0  # ModelOpt's TensorRT-LLM path would floor it at 1.0


def test_mixtral_experts_are_stacked_up_then_gate(exports):
    model, folders = exports["mixtral_fp8"]
    full = load_file(folders[1] / "rank0.safetensors")
    fc = full["transformer.layers.0.mlp.fc.weight"]
    experts = model.model.layers[0].mlp.experts
    assert fc.shape == (4, 512, 128) and fc.dtype == torch.float8_e4m3fn
    scale = full["transformer.layers.0.mlp.fc.weights_scaling_factor"]
    assert scale.shape == (4, 1)
    gate, up = experts.gate_up_proj[2].detach().chunk(2)
    decoded = fc[2].double() * scale[2].double()
    wq = experts.quant_up_proj[2].weight_quantizer
    fq_gate, fq_up = wq(experts.quant_up_proj[2].weight.detach()).double().chunk(2)
    torch.testing.assert_close(decoded[:256], fq_up, rtol=1e-6, atol=0)  # up first
    torch.testing.assert_close(decoded[256:], fq_gate, rtol=1e-6, atol=0)
    assert not torch.equal(gate, up)
    assert full["transformer.layers.0.mlp.router.weight"].dtype == torch.float32


def test_pipeline_parallel_stages_number_their_layers_from_zero(exports, tmp_path):
    model, _ = exports["int8_sq"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder = export_tensorrt_llm_checkpoint(
            model, "llama", torch.float32, tmp_path / "pp", 2, inference_pipeline_parallel=2
        )
    cfg = validate_tensorrt_llm_checkpoint(folder)
    assert cfg["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    rank3 = load_file(folder / "rank3.safetensors")  # stage 1, tp rank 1: layer 1, ln_f, lm_head
    assert "transformer.layers.0.attention.qkv.weight" in rank3
    assert "transformer.layers.1.attention.qkv.weight" not in rank3
    assert "lm_head.weight" in rank3 and "transformer.vocab_embedding.weight" not in rank3
    assert "lm_head.weight" not in load_file(folder / "rank1.safetensors")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        rebuilt = rebuild(folder, tiny_model("llama", seed=7, **NARROW))(input_ids=IDS).logits
    assert (rebuilt - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_smoothquant_plugin_layout_folds_smoothing_into_the_norms(tmp_path, family):
    sizes = NARROW if family == "llama" else {}
    model = tiny_model(family, **sizes)
    mtq.quantize(
        model, mtq.INT8_SMOOTHQUANT_CFG, lambda m: [m(**b) for b in random_token_batches()]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder = export_tensorrt_llm_checkpoint(
            model, "gpt" if family == "gpt2" else "llama", torch.float32, tmp_path / "sq", 2,
            smoothquant_plugin=True,
        )  # fmt: skip
    cfg = validate_tensorrt_llm_checkpoint(folder)
    assert cfg["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    rank1 = load_file(folder / "rank1.safetensors")
    hidden = 128 if family == "llama" else 64
    assert rank1["transformer.layers.0.attention.dense.smoother"].shape == (1, hidden // 2)
    assert rank1["transformer.layers.0.attention.qkv.act_scale"].shape == (1, 1)
    assert rank1["transformer.layers.0.input_layernorm.scale_to_int"].shape == (1,)
    assert rank1["transformer.layers.0.mlp.quantization_scaling_factor"].shape == (1,)
    assert "transformer.layers.0.attention.qkv.prequant_scaling_factor" not in rank1
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        rebuilt = rebuild(folder, tiny_model(family, seed=7, **sizes))(input_ids=IDS).logits
        float_logits = tiny_model(family, **sizes)(input_ids=IDS).logits
    # smoothing moved into the norms and 1 / (1 / s) round in float32: equal up to its rounding
    error = (rebuilt - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item()
    assert (float_logits - expected).abs().max().item() > 1e3 * error


def test_bfloat16_checkpoint_keeps_codes_and_fp32_scales(tmp_path):
    model = tiny_model("llama", **NARROW)
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: [m(**b) for b in random_token_batches()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder = export_tensorrt_llm_checkpoint(model, "llama", torch.bfloat16, tmp_path / "ck")
    rank0 = load_file(folder / "rank0.safetensors")
    assert rank0["transformer.layers.0.attention.qkv.weight"].dtype == torch.float8_e4m3fn
    assert rank0["transformer.layers.0.attention.qkv.weights_scaling_factor"].dtype == torch.float32
    assert rank0["transformer.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert json.loads((folder / "config.json").read_text())["logits_dtype"] == "float16"


def _plain(family: str = "llama", **sizes):
    return tiny_model(family, **(sizes or NARROW))


@pytest.mark.parametrize(
    ("make", "decoder", "tp", "match"),
    [
        (lambda: _plain("phi"), "llama", 1, "architecture 'phi'"),
        (lambda: _plain("llama"), "falcon", 1, "decoder_type 'falcon'"),
        (lambda: _plain("llama"), "llama", 3, "not divisible by inference_tensor_parallel=3"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, make, decoder, tp, match):
    with pytest.raises(ValueError, match=match) as info:
        export_tensorrt_llm_checkpoint(
            make(), decoder, torch.float16, tmp_path / "x", inference_tensor_parallel=tp
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "cfg", ["MXFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG", "NVFP4_AWQ_LITE_CFG+FP8_KV_CFG"]
)
def test_formats_tensorrt_llm_cannot_hold_are_refused(tmp_path, cfg):
    """(NVFP4 AWQ alone now exports: calibration folds its scales. With a quantized V cache,
    o_proj's scale cannot go into v_proj's rows and TensorRT-LLM's NVFP4 has no pre-quant scale.)"""
    model = tiny_model("llama", **NARROW)
    config, _, kv = cfg.partition("+")
    config = getattr(mtq, config)
    if kv:
        config = quant_llm.with_kv_cache(config, getattr(mtq, kv))
    mtq.quantize(model, config, lambda m: [m(**b) for b in random_token_batches(batches=1)])
    with pytest.raises(UnsupportedFormatError, match="TensorRT-LLM") as info:
        export_tensorrt_llm_checkpoint(model, "llama", torch.float16, tmp_path / "x")
    assert "layer model.layers." in str(info.value) and "Hugging Face" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_validator_names_a_missing_tensor_and_a_missing_rank(exports, tmp_path):
    _, folders = exports["fp8"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folders[2].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    rank1 = load_file(broken / "rank1.safetensors")
    del rank1["transformer.layers.1.attention.qkv.activation_scaling_factor"]
    save_file(rank1, str(broken / "rank1.safetensors"))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rank1.safetensors: missing transformer.layers.1.attention.qkv.activation_scaling_factor"
        ),
    ):
        validate_tensorrt_llm_checkpoint(broken)
    (broken / "rank0.safetensors").unlink()
    with pytest.raises(ValueError, match=re.escape("missing rank0.safetensors")):
        validate_tensorrt_llm_checkpoint(broken)

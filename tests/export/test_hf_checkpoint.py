"""export_hf_checkpoint: real safetensors files whose codes and scales dequantize (float64, own reference) to the fake-quantized weights."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

import quant_core as mtq
import quant_export.checkpoint_files as checkpoint_files
from quant_export import UnsupportedFormatError, export_hf_checkpoint

transformers = pytest.importorskip("transformers")
quant_llm = pytest.importorskip("quant_llm")
from hf_decode import dequantize_hf  # noqa: E402

from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (config, expected quant_algo, expected kv_cache_quant_algo, kv bound, group size)
CASES = {
    "fp8": ("FP8_DEFAULT_CFG", "FP8_KV_CFG", "FP8", "FP8", 448.0, None),
    "int4_awq": ("INT4_AWQ_CFG", None, "W4A16_AWQ", None, None, 128),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4_KV_CFG", "NVFP4", "NVFP4", 448.0, 16),
}


def _tiny_llama() -> torch.nn.Module:
    # 128-wide so that INT4 blocks of 128 divide every input size.
    return tiny_model("llama", hidden_size=128, intermediate_size=256)


def _forward_loop(model: torch.nn.Module) -> None:
    for batch in random_token_batches(batches=2, batch_size=2, seq_len=16):
        model(**batch)


def _config(name: str) -> dict:
    cfg_name, kv_name = CASES[name][:2]
    cfg = getattr(mtq, cfg_name)
    if kv_name is None:
        return cfg
    return quant_llm.with_kv_cache(cfg, getattr(mtq, kv_name, None) or getattr(quant_llm, kv_name))


class _Exports(dict):
    """name -> (quantized model, export dir, {tensor name: tensor}), built on first use of each case.

    Lazy per case, so that a pytest-xdist worker only quantizes the cases its tests need.
    """

    def __init__(self, factory) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, name: str):
        model = _tiny_llama()
        mtq.quantize(model, _config(name), _forward_loop)
        path = export_hf_checkpoint(model, self._factory.mktemp(name) / "ckpt")
        self[name] = (model, path, _read(path / "model.safetensors"))
        return self[name]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> _Exports:
    """The quantized and exported tiny Llama of each case in CASES."""
    return _Exports(tmp_path_factory)


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _layers(model):
    """(name, module) of every Linear in the decoder layers."""
    for i, layer in enumerate(model.model.layers):
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for proj in LINEARS:
                if hasattr(parent, proj):
                    yield f"model.layers.{i}.{parent_name}.{proj}", getattr(parent, proj)


@pytest.mark.parametrize("name", list(CASES))
def test_stored_weights_dequantize_to_the_fake_quantized_weights(exported, name):
    model, _, tensors = exported[name]
    algo, group = CASES[name][2], CASES[name][5]
    for layer_name, module in _layers(model):
        layer = {
            k.removeprefix(f"{layer_name}."): v
            for k, v in tensors.items()
            if k.startswith(f"{layer_name}.")
        }
        with torch.no_grad():
            fq = module.weight_quantizer(module.weight).float()
        ref = dequantize_hf(algo, layer, group)
        ulp = (torch.nextafter(fq.abs(), torch.tensor(math.inf)) - fq.abs()).double()
        err = (ref - fq.double()).abs()
        assert (err <= ulp).all(), f"{layer_name}: max error {err.max()} ({(err / ulp).max()} ulp)"
        assert ref.abs().max() > 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "fp8",
            {
                "weight": torch.float8_e4m3fn,
                "weight_scale": torch.float32,
                "input_scale": torch.float32,
            },
        ),
        (
            "int4_awq",
            {
                "weight": torch.uint8,
                "weight_scale": torch.float32,
                "pre_quant_scale": torch.float32,
            },
        ),
        (
            "nvfp4",
            {
                "weight": torch.uint8,
                "weight_scale": torch.float8_e4m3fn,
                "weight_scale_2": torch.float32,
                "input_scale": torch.float32,
            },
        ),
    ],
)
def test_layer_tensors_have_modelopt_names_dtypes_and_shapes(exported, name, expected):
    _, _, tensors = exported[name]
    prefix = "model.layers.1.self_attn.q_proj."  # Linear(128 -> 128)
    layer = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    assert {k: v.dtype for k, v in layer.items()} == expected
    shapes = {
        "fp8": {"weight": (128, 128), "weight_scale": (), "input_scale": ()},
        "int4_awq": {"weight": (64, 128), "weight_scale": (128, 1), "pre_quant_scale": (128,)},
        "nvfp4": {
            "weight": (128, 64),
            "weight_scale": (128, 8),
            "weight_scale_2": (),
            "input_scale": (),
        },
    }[name]
    assert {k: tuple(v.shape) for k, v in layer.items()} == shapes


@pytest.mark.parametrize("name", ["fp8"])
def test_input_scale_is_calibrated_amax_over_format_max(exported, name):
    model, _, tensors = exported[name]
    bound = 448.0
    for layer_name, module in _layers(model):
        expected = module.input_quantizer.amax.double() / bound
        assert tensors[f"{layer_name}.input_scale"].double().item() == pytest.approx(
            expected.item(), rel=1e-7
        )


FUSED = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def _fused_key(name: str) -> str:
    """The fused GEMM a layer belongs to in vLLM / TensorRT-LLM (``...self_attn.qkv``), else itself."""
    parent, _, proj = name.rpartition(".")
    return f"{parent}.{FUSED[proj]}" if proj in FUSED else name


def test_nvfp4_global_scales_are_amax_over_6_times_448_shared_by_fused_layers(exported):
    model, _, tensors = exported["nvfp4"]
    group_amax: dict[str, torch.Tensor] = {}
    for name, module in _layers(model):  # dynamic NVFP4 weights: global amax = max |W|
        amax = module.weight.detach().abs().max().double()
        key = _fused_key(name)
        group_amax[key] = torch.maximum(group_amax.get(key, amax), amax)
    for name, module in _layers(model):
        expected = group_amax[_fused_key(name)] / (6 * 448)
        assert tensors[f"{name}.weight_scale_2"].double().item() == pytest.approx(
            expected.item(), rel=1e-6
        )
        in_amax = module.input_quantizer.amax.double()
        assert tensors[f"{name}.input_scale"].double().item() == pytest.approx(
            (in_amax / 2688).item(), rel=1e-6
        )
    q, k = (tensors[f"model.layers.0.self_attn.{p}.weight_scale_2"] for p in ("q_proj", "k_proj"))
    o = tensors["model.layers.0.self_attn.o_proj.weight_scale_2"]
    assert q == k and q != o


def test_nvfp4_global_scales_are_shared_by_calibration_and_per_layer_only_on_request(tmp_path):
    model = _tiny_llama()
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, _forward_loop)
    qkv = [model.model.layers[0].self_attn.get_submodule(f"{p}_proj") for p in "qkv"]
    largest = max(m.weight.detach().abs().max() for m in qkv)
    assert all(
        m.weight_quantizer.amax.reshape(()) == largest for m in qkv
    )  # shared when calibrated
    qkv[0].weight_quantizer.amax = qkv[0].weight.detach().abs().max().reshape(1)  # edited by hand
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedFormatError, match=r"q_proj.*NVFP4 global.*make_deployable"):
        export_hf_checkpoint(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.warns(mtq.QuantWarning, match="share_fused_scales=False"):
        path = export_hf_checkpoint(model, tmp_path / "ckpt", share_fused_scales=False)
    tensors = _read(path / "model.safetensors")
    for name, module in _layers(model):
        expected = module.weight_quantizer.amax.double().reshape(()) / 2688
        assert tensors[f"{name}.weight_scale_2"].double().item() == pytest.approx(
            expected.item(), rel=1e-6
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("name", ["fp8", "nvfp4"])
def test_kv_scales_are_calibrated_amax_over_format_bound(exported, name):
    model, _, tensors = exported[name]
    bound = CASES[name][4]
    seen = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for letter in "kv":
            scale = tensors[f"model.layers.{i}.self_attn.{letter}_proj.{letter}_scale"]
            amax = getattr(attn, f"{letter}_bmm_quantizer").amax.double().max()
            assert scale.dtype == torch.float32 and scale.shape == ()
            assert scale.double().item() == pytest.approx((amax / bound).item(), rel=1e-7)
            assert torch.isfinite(scale) and scale > 0 and scale.item() != 1.0
            seen.append(scale.item())
    # calibrated per layer, never a shared default; keys and values of one layer share the larger
    # amax (TensorRT-LLM's one kv_cache_scaling_factor, set by calibration for every layout)
    assert seen[0::2] == seen[1::2] and len(set(seen)) == len(seen) // 2


def test_int4_awq_scales_are_folded_and_unfused_loaders_get_a_unit_pre_quant_scale(exported):
    model, _, tensors = exported["int4_awq"]
    for name, module in _layers(model):
        assert module.input_quantizer.pre_quant_scale is None  # folded into norms / rows
        # TensorRT-LLM's unfused W4A16_AWQ loader reads pre_quant_scale unconditionally
        pqs = tensors[f"{name}.pre_quant_scale"]
        assert torch.equal(pqs, torch.ones_like(pqs))
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # AWQ's q/k/v scale lives here now


def test_modelopt_layout_refuses_what_no_engine_loads(tmp_path):
    model = _tiny_llama()
    mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG, _forward_loop)
    with pytest.raises(
        UnsupportedFormatError, match=r"no engine loads W8A8_SQ.*TensorRT-LLM takes"
    ):
        export_hf_checkpoint(model, tmp_path / "sq")
    model = _tiny_llama()
    mtq.quantize(model, mtq.INT4_AWQ_CFG, _forward_loop)
    with pytest.raises(UnsupportedFormatError, match=r"W4A16_AWQ.*vLLM takes FP8"):
        export_hf_checkpoint(model, tmp_path / "awq", engine="vllm")
    assert not (tmp_path / "sq").exists() and not (tmp_path / "awq").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_config_json_round_trips_through_autoconfig(exported, name):
    _, path, _ = exported[name]
    algo, kv_algo, group = CASES[name][2], CASES[name][3], CASES[name][5]
    config = transformers.AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    assert qc["quant_method"] == "modelopt"
    assert (qc["quant_algo"], qc["kv_cache_quant_algo"], qc.get("group_size")) == (
        algo,
        kv_algo,
        group,
    )
    assert qc["exclude_modules"] == qc["ignore"] == ["lm_head"]
    assert config.dtype == torch.bfloat16 and config.architectures == ["LlamaForCausalLM"]
    modelopt = json.loads((path / "hf_quant_config.json").read_text())
    assert {k: v for k, v in qc.items() if k in modelopt["quantization"]} == modelopt[
        "quantization"
    ]
    if name == "int4_awq":
        assert modelopt["quantization"]["pre_quant_scale"] is True


def test_unquantized_tensors_keep_their_names_in_the_chosen_dtype(exported):
    model, _, tensors = exported["fp8"]
    state = {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}
    assert set(state) <= set(tensors)
    assert not [k for k in tensors if "quantizer" in k or "_amax" in k]
    for key in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert tensors[key].dtype == torch.bfloat16
        assert torch.equal(tensors[key], state[key].to(torch.bfloat16))


def test_float16_export_and_bad_dtype(tmp_path):
    model = _tiny_llama()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, _forward_loop)
    path = export_hf_checkpoint(model, tmp_path / "fp16", dtype=torch.float16)
    tensors = _read(path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_hf_checkpoint(model, tmp_path / "int8", dtype=torch.int8)
    assert not (tmp_path / "int8").exists()


def test_disabled_layers_are_excluded_and_mixed_formats_are_per_layer(tmp_path):
    model = _tiny_llama()
    cfg = mtq.FP8_DEFAULT_CFG.copy()
    cfg["quant_cfg"]["*down_proj.weight_quantizer"] = {"num_bits": (4, 3), "axis": 0}
    cfg["quant_cfg"]["*down_proj.input_quantizer"] = {
        "num_bits": (4, 3),
        "block_sizes": {-1: None, "type": "dynamic"},
    }
    cfg["quant_cfg"]["*layers.1.mlp.up_proj*"] = {"enable": False}
    mtq.quantize(model, cfg, _forward_loop)
    path = export_hf_checkpoint(model, tmp_path / "mixed")
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "MIXED_PRECISION"
    assert quant["exclude_modules"] == ["lm_head", "model.layers.1.mlp.up_proj"]
    layers = quant["quantized_layers"]
    assert layers["model.layers.0.mlp.down_proj"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
    assert layers["model.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert "model.layers.1.mlp.up_proj" not in layers
    tensors = _read(path / "model.safetensors")
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    groups = quant["config_groups"]  # one per scheme, named layers as targets
    assert sorted(len(g["targets"]) for g in groups.values()) == [2, 11]
    # SGLang takes no MIXED_PRECISION (python/sglang/srt/layers/quantization/modelopt_quant.py)
    assert json.loads((path / "hf_quant_config.json").read_text())["loaders"] == [
        "vllm",
        "tensorrt_llm",
    ]


def test_large_checkpoints_are_sharded_with_an_index(exported, tmp_path):
    model, _, single = exported["fp8"]
    path = export_hf_checkpoint(model, tmp_path / "sharded", max_shard_size=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (path / "model.safetensors").exists()
    merged = {}
    for fname in files:
        merged.update(_read(path / fname))
    assert set(merged) == set(single) == set(index["weight_map"])
    assert all(
        torch.equal(merged[k].view(torch.uint8), single[k].view(torch.uint8))
        for k in single
        if merged[k].dtype == torch.float8_e4m3fn
    )


def test_failed_write_leaves_no_partial_directory(exported, tmp_path, monkeypatch):
    model, _, _ = exported["fp8"]

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_files, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf_checkpoint(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []  # neither the directory nor a staging folder is left

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "tokenizer.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export_hf_checkpoint(model, existing)
    assert os.listdir(existing) == ["tokenizer.json"] and os.listdir(tmp_path) == ["existing"]


def test_export_into_an_existing_directory_keeps_other_files(exported, tmp_path):
    model, _, _ = exported["fp8"]
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    export_hf_checkpoint(model, target)
    assert sorted(os.listdir(target)) == [
        "config.json",
        "generation_config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("mxfp8", r"layer model\.layers\.0\.self_attn\.q_proj: weight e4m3 block"),
        ("w4a8", r"layer model\.layers\.0\.self_attn\.q_proj: multi-stage quantizer"),
        ("output", r"quantizer model\.layers\.0\.self_attn\.q_proj\.output_quantizer"),
    ],
)
def test_unsupported_format_raises_naming_the_module_and_writes_nothing(tmp_path, edit, message):
    if edit == "mxfp8":
        cfg = mtq.MXFP8_DEFAULT_CFG
    elif edit == "w4a8":
        cfg = mtq.W4A8_AWQ_BETA_CFG.copy()
        cfg["algorithm"] = "max"
    else:
        cfg = mtq.FP8_DEFAULT_CFG.copy()
        cfg["quant_cfg"]["*q_proj.output_quantizer"] = {
            "num_bits": (4, 3),
            "axis": None,
            "enable": True,
        }
    model = _tiny_llama()
    mtq.quantize(model, cfg, _forward_loop)
    with pytest.raises(UnsupportedFormatError, match=message):
        export_hf_checkpoint(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_uncalibrated_kv_quantizer_is_an_error(tmp_path):
    model = _tiny_llama()
    mtq.quantize(model, quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG), _forward_loop)
    model.model.layers[1].self_attn.v_bmm_quantizer.amax = None
    with pytest.raises(
        UnsupportedFormatError,
        match=r"model\.layers\.1\.self_attn\.v_bmm_quantizer was never calibrated",
    ):
        export_hf_checkpoint(model, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("cfg_name", "algo", "group", "keys"),
    [
        (
            "FP8_PER_CHANNEL_PER_TOKEN_CFG",
            "FP8_PER_CHANNEL_PER_TOKEN",
            None,
            {"weight", "weight_scale"},
        ),
        ("INT8_WEIGHT_ONLY_CFG", "W8A16", None, {"weight", "weight_scale"}),
        ("W4A16_NVFP4_CFG", "W4A16_NVFP4", 16, {"weight", "weight_scale", "weight_scale_2"}),
        # AWQ's scales all fold (norms, v_proj / up_proj rows): a plain NVFP4 checkpoint
        (
            "NVFP4_AWQ_LITE_CFG",
            "NVFP4",
            16,
            {"weight", "weight_scale", "weight_scale_2", "input_scale"},
        ),
    ],
)
def test_other_builtin_configs_export_their_modelopt_format(tmp_path, cfg_name, algo, group, keys):
    model = _tiny_llama()
    mtq.quantize(model, getattr(mtq, cfg_name), _forward_loop)
    path = export_hf_checkpoint(model, tmp_path / "ckpt")
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant.get("group_size")) == (algo, group)
    tensors = _read(path / "model.safetensors")
    name, module = "model.layers.1.mlp.down_proj", model.model.layers[1].mlp.down_proj
    layer = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
    assert set(layer) == keys
    with torch.no_grad():
        fq = module.weight_quantizer(module.weight).float()
    ulp = (torch.nextafter(fq.abs(), torch.tensor(math.inf)) - fq.abs()).double()
    assert ((dequantize_hf(algo, layer, group) - fq.double()).abs() <= ulp).all()


def test_affine_kv_cache_exports_its_static_bias(tmp_path):
    model = _tiny_llama()
    mtq.quantize(
        model, quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_AFFINE_KV_CFG), _forward_loop
    )
    tensors = _read(export_hf_checkpoint(model, tmp_path / "ckpt") / "model.safetensors")
    quantizer = model.model.layers[0].self_attn.k_bmm_quantizer
    bias = tensors["model.layers.0.self_attn.k_proj.k_bias"]
    assert torch.equal(bias, quantizer._bias_value.float()) and bias.abs().max() > 0
    assert tensors["model.layers.0.self_attn.k_proj.k_scale"].item() == pytest.approx(
        quantizer.amax.item() / 448, rel=1e-7
    )


def test_a_model_without_quantized_layers_warns_and_exports_plain_weights(tmp_path):
    model = _tiny_llama()
    cfg = mtq.FP8_DEFAULT_CFG.copy()
    cfg["quant_cfg"]["*"] = {"enable": False}
    with pytest.warns(RuntimeWarning, match="enabled no quantizer"):
        mtq.quantize(model, cfg, _forward_loop)
    with pytest.warns(UserWarning, match="no quantized layer or KV cache"):
        path = export_hf_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    tensors = _read(path / "model.safetensors")
    assert torch.equal(
        tensors["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight
    )
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] is None and "model.layers.0.mlp.up_proj" in quant["exclude_modules"]


def _fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _input_fn(algo: str, t: dict[str, torch.Tensor]):
    """What an engine does to a layer's input, from the stored tensors only."""
    pqs = t.get("pre_quant_scale")
    scale = t.get("input_scale")

    def fn(x: torch.Tensor) -> torch.Tensor:
        if pqs is not None:
            x = x * pqs
        if algo == "FP8":
            return _fp8_qdq(x, scale)
        if algo == "FP8_PER_CHANNEL_PER_TOKEN":
            return _fp8_qdq(x, x.abs().amax(-1, keepdim=True) / 448)
        if algo == "NVFP4":  # dynamic E4M3 block scales under the stored global scale
            import quant_kernels as qk

            return qk.fake_quantize(
                x, num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3),
                global_amax=scale * 6 * 448,
            )  # fmt: skip
        return x

    return fn


def _rebuild(path) -> torch.nn.Module:
    """A float model holding the checkpoint's dequantized weights, its inputs treated as the files say."""
    config = transformers.AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    tensors = _read(path / "model.safetensors")
    state = {k: v.float() for k, v in tensors.items() if v.is_floating_point() and v.dim() < 3}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.weight_scale" not in tensors:
            continue
        layer = {
            k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")
        }
        algo = quant["quant_algo"]
        state[f"{name}.weight"] = dequantize_hf(algo, layer, quant.get("group_size")).float()
        fn = _input_fn(algo, layer)
        module.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]),))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


@pytest.mark.parametrize(
    "cfg_name",
    ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "INT4_AWQ_CFG", "NVFP4_AWQ_LITE_CFG"],
)
def test_a_reader_of_the_files_reproduces_the_fake_quant_logits(tmp_path, cfg_name):
    """Folded scales (norms, v_proj / up_proj rows) and the stored names are all the reader needs."""
    model = _tiny_llama()
    mtq.quantize(model, {**getattr(mtq, cfg_name).copy(), "algorithm": "max"}
                 if cfg_name.startswith("FP8") else getattr(mtq, cfg_name), _forward_loop)  # fmt: skip
    path = export_hf_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    ids = random_token_batches(batches=1, batch_size=2, seq_len=12, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        got = _rebuild(path)(ids).logits
    # float64 dequantization vs the model's float32 fake quant: float32 rounding only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())

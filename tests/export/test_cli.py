"""The quant-export command line: --help texts, the onnx and hf subcommands with a module:function factory."""

from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch
from safetensors import safe_open

import quant_core as mtq
from quant_export.cli import main


def quantized_mlp():
    """Factory used by the CLI test (module:function); returns (model, sample_inputs)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    ).eval()
    x = torch.randn(4, 32)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    return model, x


def quantized_tiny_llama():
    """Factory used by the hf CLI test: a tiny Llama with FP8 weights, activations and KV cache."""
    import quant_llm
    from quant_llm.testing.tiny_models import random_token_batches, tiny_model

    model = tiny_model("llama")
    batches = random_token_batches()
    cfg = quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)
    mtq.quantize(model, cfg, lambda m: [m(**b) for b in batches])
    return model


@pytest.mark.parametrize(
    ("command", "phrase"),
    [
        ("onnx", "MODULE:FUNCTION"),
        ("engine", "strongly typed"),
        ("hf", "k_scale"),
        ("trtllm", "rank{r}.safetensors"),
    ],
)
def test_subcommand_help_explains_it(command, phrase, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert phrase in capsys.readouterr().out


def test_onnx_subcommand_exports_and_verifies(tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    assert (
        main(["onnx", "--model", f"{__name__}:quantized_mlp", "--output", str(out), "--verify"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "relative error" in printed
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_onnx_subcommand_rejects_text_that_is_not_module_function(tmp_path):
    with pytest.raises(SystemExit, match=r"package\.module:function"):
        main(
            [
                "onnx",
                "--model",
                "__import__('os').system('true')",
                "--output",
                str(tmp_path / "m.onnx"),
            ]
        )


def test_engine_subcommand_without_tensorrt_reports_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    assert main(["engine", str(onnx_file), str(tmp_path / "m.engine")]) == 1
    assert "pip install quant-export[tensorrt]" in capsys.readouterr().err


def test_hf_subcommand_writes_a_checkpoint(tmp_path, capsys):
    pytest.importorskip("quant_llm")
    out = tmp_path / "ckpt"
    argv = ["hf", "--model", f"{__name__}:quantized_tiny_llama", "--output", str(out)]
    assert main([*argv, "--dtype", "float16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ("FP8", "FP8")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.layers.0.self_attn.k_proj.k_scale").item() > 0


def test_trtllm_subcommand_writes_tensor_parallel_ranks(tmp_path, capsys):
    pytest.importorskip("quant_llm")
    out = tmp_path / "trt"
    argv = ["trtllm", "--model", f"{__name__}:quantized_tiny_llama", "--output", str(out)]
    assert main([*argv, "--tp", "2", "--dtype", "bfloat16"]) == 0
    assert f"wrote {out} (2 ranks)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2 and config["dtype"] == "bfloat16"
    assert (
        config["quantization"]["quant_algo"],
        config["quantization"]["kv_cache_quant_algo"],
    ) == (
        "FP8",
        "FP8",
    )
    with safe_open(str(out / "rank1.safetensors"), "pt") as f:
        assert (
            f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.float8_e4m3fn
        )


def test_trtllm_validate_subcommand_names_what_is_wrong(tmp_path, capsys):
    pytest.importorskip("quant_llm")
    out = tmp_path / "trt"
    argv = ["trtllm", "--model", f"{__name__}:quantized_tiny_llama", "--output", str(out)]
    assert main(argv) == 0
    assert main(["trtllm-validate", str(out)]) == 0
    assert (
        "valid TensorRT-LLM checkpoint (LlamaForCausalLM, quant_algo FP8" in capsys.readouterr().out
    )
    (out / "rank0.safetensors").unlink()
    assert main(["trtllm-validate", str(out)]) == 1
    assert "missing rank0.safetensors" in capsys.readouterr().err


def test_trtllm_subcommand_refuses_a_head_count_tp_does_not_divide(tmp_path, capsys):
    pytest.importorskip("quant_llm")
    argv = [
        "trtllm",
        "--model",
        f"{__name__}:quantized_tiny_llama",
        "--output",
        str(tmp_path / "t"),
    ]
    assert main([*argv, "--tp", "3"]) == 1
    err = capsys.readouterr().err
    assert "not divisible by inference_tensor_parallel=3" in err and err.count("\n") == 1

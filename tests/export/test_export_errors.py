"""Export and CLI errors that name the problem, and warnings for exports that are probably not what
the user meant (issue #17)."""

from __future__ import annotations

import os
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core import QuantWarning
from quant_core.atomic import SUFFIX
from quant_export import export_hf_checkpoint, export_onnx, verify_onnx
from quant_export.cli import main


def quantized_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    return model, x


def failing_factory():
    """A --model factory failing with an exception type the CLI has no special case for."""
    raise KeyError("no such layer: 'decoder.7'")


def test_export_after_fold_weight_warns_that_weights_are_float(tmp_path):
    model, x = quantized_mlp()
    mtq.fold_weight(model)
    with pytest.warns(QuantWarning, match=r"weights of 0, 2 were folded.*float32"):
        export_onnx(model, x, tmp_path / "m.onnx")


def test_export_after_temporary_fold_does_not_warn(tmp_path):
    model, x = quantized_mlp()
    with mtq.temporarily_fold_weights(model):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantWarning)
        assert export_onnx(model, x, tmp_path / "m.onnx").is_file()


def test_verify_onnx_gives_back_the_models_training_mode(tmp_path):
    model, x = quantized_mlp()
    path = export_onnx(model, x, tmp_path / "m.onnx")
    model.train()
    report = verify_onnx(path, model, x)
    assert model.training and all(m.training for m in model.modules())
    assert report.rel_error < 0.05


def test_wrong_sample_input_shape_names_the_input(tmp_path):
    model, _ = quantized_mlp()
    with pytest.raises(ValueError, match=r"sample_inputs \(tensor\(2, 5\)\).*2x5 and 8x8"):
        export_onnx(model, torch.randn(2, 5), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_write_removes_leftovers_of_a_killed_export(tmp_path):
    model, x = quantized_mlp()
    leftover = tmp_path / f".m.onnx.{2**22 + 1}.k1ll{SUFFIX}"  # above Linux's pid_max: never live
    leftover.write_bytes(b"partial")
    export_onnx(model, x, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_hf_export_removes_leftover_staging_folder(tmp_path):
    pytest.importorskip("quant_llm")
    from quant_llm.testing.tiny_models import random_token_batches, tiny_model

    model = tiny_model("llama")
    batches = random_token_batches()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: [m(**b) for b in batches])
    staging = tmp_path / f".ckpt.{2**22 + 1}.abc{SUFFIX}"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    export_hf_checkpoint(model, export_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["onnx", "--model", f"{__name__}:failing_factory", "--output", str(tmp_path / "m.onnx")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "KeyError" in err and "decoder.7" in err and "--debug" in err
    with pytest.raises(KeyError, match=r"decoder\.7"):
        main([*argv, "--debug"])


def test_cli_finds_a_factory_module_in_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_factory_17.py").write_text(
        textwrap.dedent(
            f"""
            from {__name__} import quantized_mlp as make
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "my_factory_17", raising=False)
    out = tmp_path / "m.onnx"
    assert main(["onnx", "--model", "my_factory_17:make", "--output", str(out)]) == 0
    assert out.is_file()


def test_cli_missing_factory_module_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"current folder .*PYTHONPATH"):
        main(["onnx", "--model", "no_such_module_17:make", "--output", str(tmp_path / "m.onnx")])


def test_validate_names_a_corrupted_config_json(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"quantization_config": {"quant_method": ')
    assert main(["validate", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "config.json: not valid JSON" in err and err.count("\n") == 1

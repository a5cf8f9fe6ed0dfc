"""The quant-export command line: --help texts, the onnx subcommand with a module:function factory."""

from __future__ import annotations

import sys

import onnx
import pytest
import torch

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


@pytest.mark.parametrize(
    ("command", "phrase"), [("onnx", "MODULE:FUNCTION"), ("engine", "strongly typed")]
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

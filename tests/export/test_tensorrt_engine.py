"""build_engine: the missing-TensorRT message, argument checks, and (where TensorRT exists) a real build."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from export_models import quantized

import quant_core as mtq
from quant_export import build_engine, export_onnx
from quant_export.tensorrt_engine import TENSORRT_MISSING

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_missing_tensorrt_says_what_to_install(tmp_path, monkeypatch):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now raises ImportError
    with pytest.raises(ImportError, match=r"pip install quant-export\[tensorrt\]") as err:
        build_engine(onnx_file, tmp_path / "m.engine")
    assert str(err.value) == TENSORRT_MISSING


def test_precision_flags_conflict_with_strong_typing(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="strongly-typed"):
        build_engine(onnx_file, tmp_path / "m.engine", precisions=["fp16"])
    with pytest.raises(ValueError, match="unknown precision"):
        build_engine(onnx_file, tmp_path / "m.engine", precisions=["fp12"], strongly_typed=False)


def test_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_TENSORRT, reason="needs tensorrt (pip install quant-export[tensorrt]) and a GPU"
)
def test_int8_mlp_builds_a_strongly_typed_engine(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    path = export_onnx(
        quantized(model, mtq.INT8_DEFAULT_CFG, x), x, tmp_path / "mlp.onnx", target="tensorrt"
    )
    engine = build_engine(
        path, tmp_path / "mlp.engine", profiles=[{"input_0": ((1, 256), (8, 256), (32, 256))}]
    )
    assert engine.stat().st_size > 0
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    assert runtime.deserialize_cuda_engine(engine.read_bytes()) is not None

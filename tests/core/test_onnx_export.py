"""ONNX export of quantized models: Q/DQ pairs from both torch exporters, run in onnxruntime."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quant_core as mtq

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def quantized_mlp(cfg_name: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = [torch.randn(4, 16) for _ in range(3)]
    return mtq.quantize(model, getattr(mtq, cfg_name), lambda m: [m(b) for b in calib])


def run(path: str, x: torch.Tensor):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, options)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(("cfg_name", "opset"), [("INT8_DEFAULT_CFG", 17), ("FP8_DEFAULT_CFG", 19)])
def test_legacy_exporter_gives_qdq(cfg_name, opset, tmp_path):
    model = quantized_mlp(cfg_name)
    x = torch.randn(4, 16)
    path = str(tmp_path / "legacy.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset)
    nodes = onnx.load(path).graph.node
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) == 4
    assert sum(n.op_type == "DequantizeLinear" for n in nodes) == 4
    assert abs(run(path, x) - model(x).detach().numpy()).max() < 1e-5


def test_per_channel_int8_weights_export_with_an_axis(tmp_path):
    pytest.importorskip("onnxscript")
    model = quantized_mlp("INT8_DEFAULT_CFG")
    x = torch.randn(4, 16)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(model, (x,), path)
    graph = onnx.load(path).graph
    axes = [
        a.i
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
        if a.name == "axis"
    ]
    init = {t.name: t for t in graph.initializer}
    scales = [
        onnx.numpy_helper.to_array(init[n.input[1]])
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in init
    ]
    assert sorted(s.size for s in scales) == [1, 1, 8, 32] and 0 in axes
    assert abs(run(path, x) - model(x).detach().numpy()).max() < 1e-5


def test_dynamo_exporter_gives_fp8_qdq(tmp_path):
    """The dynamo exporter maps quant-core's FP8 op to QuantizeLinear/DequantizeLinear with an FP8
    zero point (the translation registered when an FP8 quantizer is configured)."""
    pytest.importorskip("onnxscript")
    model = quantized_mlp("FP8_DEFAULT_CFG")
    x = torch.randn(4, 16)
    path = str(tmp_path / "dynamo.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, opset_version=21)
    graph = onnx.load(path).graph
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 4 and sum(n.op_type == "DequantizeLinear" for n in graph.node) == 4
    tensors = {t.name: t for t in graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"})
    zero_points = [tensors[n.input[2]].data_type for n in quantize]
    assert zero_points == [onnx.TensorProto.FLOAT8E4M3FN] * 4
    assert abs(run(path, x) - model(x).detach().numpy()).max() < 1e-5

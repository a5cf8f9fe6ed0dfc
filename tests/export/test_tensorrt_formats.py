"""NVFP4 and MXFP8 exports for TensorRT: TensorRT's custom ops, checked structurally and, for the
weights, decoded with onnx's reference evaluator against a float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_models import quantized
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

import quant_core as mtq
from quant_export import UnsupportedFormatError, export_onnx

E2M1_GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_nvfp4_export_uses_trt_fp4_dynamic_quantize_and_fp4_weights(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.NVFP4_DEFAULT_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "nvfp4.onnx", target="tensorrt")
    proto = onnx.load(str(path))
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] >= 23 and opsets["trt"] == 1
    dyn = [n for n in proto.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert len(dyn) == 2 and all(n.domain == "trt" for n in dyn)
    assert all(
        _attrs(n) == {"axis": -1, "block_size": 16, "scale_type": TensorProto.FLOAT8E4M3FN}
        for n in dyn
    )
    fp4 = [i for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT4E2M1]
    scales = [i for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]
    assert len(fp4) == 2 and len(scales) == 2
    assert {tuple(i.dims) for i in fp4} <= {(256, 256), (128, 256), (256, 128)}


def _nvfp4_weight_float64(weight: torch.Tensor) -> np.ndarray:
    """NVFP4 fake quantization of a weight in float64 (block 16, E4M3 block scales, global scale)."""
    w = weight.detach().double().numpy()
    g = np.abs(w).max() / (6 * 448)
    blocks = w.reshape(w.shape[0], -1, 16)
    s = np.abs(blocks).max(-1, keepdims=True) / 6 / g
    s = torch.from_numpy(np.minimum(s, 448)).float().to(torch.float8_e4m3fn).double().numpy() * g
    s = np.where(s == 0, 1, s)
    mag = np.abs(blocks / s)
    q = E2M1_GRID[
        np.abs(mag[..., None] - E2M1_GRID).argmin(-1)
    ]  # nearest; ties checked absent below
    return (np.sign(blocks) * q * s).reshape(w.shape)


def test_nvfp4_weight_decodes_in_onnx_reference_evaluator(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.W4A16_NVFP4_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "w4a16.onnx", target="tensorrt")
    proto = onnx.load(str(path))
    graph = proto.graph
    dq_nodes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weight_out = next(
        n.output[0] for n in dq_nodes if n.input[0].startswith("2.weight_quantizer.codes")
    )
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                n
                for n in dq_nodes
                if n.input[0].startswith("2.weight_quantizer") or n.output[0] == weight_out
            ],
            "w",
            [],
            [onnx.helper.make_tensor_value_info(weight_out, TensorProto.FLOAT, None)],
            initializer=[i for i in graph.initializer if i.name.startswith("2.weight_quantizer")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 23)],
    )
    decoded = ReferenceEvaluator(sub).run(None, {})[0].astype(np.float64)
    expected = _nvfp4_weight_float64(qmodel[2].weight)
    decoded = decoded if decoded.shape == expected.shape else decoded.T
    assert np.allclose(decoded, expected, rtol=1e-6, atol=1e-7)


def test_mxfp8_export_uses_trt_mx_ops(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.MXFP8_DEFAULT_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "mxfp8.onnx", target="tensorrt")
    ops = [n for n in onnx.load(str(path)).graph.node if n.domain == "trt"]
    kinds = sorted({n.op_type for n in ops})
    assert kinds == ["TRT_MXFP8DequantizeLinear", "TRT_MXFP8DynamicQuantize"]
    assert all(_attrs(n)["block_size"] == 32 for n in ops)


@pytest.mark.parametrize("cfg", ["MXFP4_DEFAULT_CFG", "MXINT8_DEFAULT_CFG"])
def test_mx_formats_without_a_trt_op_are_rejected_by_name(cfg, mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, getattr(mtq, cfg), x)
    with pytest.raises(
        UnsupportedFormatError, match=r"layer 0: quantizer 0\.\w+_quantizer with format"
    ):
        export_onnx(qmodel, x, tmp_path / "mx.onnx", target="tensorrt")

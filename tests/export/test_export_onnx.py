"""export_onnx on a small MLP and CNN: stored types, onnxruntime agreement, graph shape, bad input."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_models import quantized, with_inputs

import quant_core as mtq
import quant_kernels as qk
from quant_export import (
    UnsupportedFormatError,
    export_onnx,
    ort_integer_matmul_saturates,
    verify_onnx,
)
from quant_export.verify import run_onnx

INT4_CONV_CFG = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {1: 8}, "enable": True},
        "*input_quantizer": {"enable": False},
        "default": {"enable": False},
    },
    "algorithm": "max",
}
# (config, stored weight type, onnxruntime optimization level used to verify)
# FP8 runs at "basic": onnxruntime 1.2x-1.3x drops a Relu in front of an FP8 QuantizeLinear
# at its "extended"/"all" levels (tested below), which is onnxruntime's bug, not the graph's.
FORMATS = {
    "int8": (mtq.INT8_DEFAULT_CFG, onnx.TensorProto.INT8, "all"),
    "fp8": (mtq.FP8_DEFAULT_CFG, onnx.TensorProto.FLOAT8E4M3FN, "basic"),
    "int4": (mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, onnx.TensorProto.INT4, "all"),
}


def _weight_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {
        i.name: i.data_type
        for i in model.graph.initializer
        if "weight_quantizer" in i.name and "codes" in i.name
    }


def _float_weights(path) -> list[str]:
    model = onnx.load(str(path))
    return [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2 and "scale" not in i.name
    ]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mlp_export_stores_quantized_weights_and_matches_pytorch(fmt, mlp_and_input, tmp_path):
    cfg, stored, level = FORMATS[fmt]
    model, x = mlp_and_input
    qmodel = quantized(model, cfg, x)
    path = export_onnx(qmodel, x, tmp_path / "mlp.onnx")
    types = _weight_types(path)
    assert len(types) == 2 and set(types.values()) == {stored}
    assert _float_weights(path) == []  # no fp32 copy of a quantized weight is left behind
    report = verify_onnx(path, qmodel, x, optimization=level)
    assert report.rel_error < 1e-4, report
    fp32 = np.asarray(model(x).detach())
    assert (
        np.abs(run_onnx(path, x, level)[0] - fp32).max() > 10 * report.max_abs_error
    )  # quantization is really there


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cnn_export_matches_pytorch(fmt, cnn_and_input, tmp_path):
    cfg, stored, level = FORMATS[fmt]
    cfg = INT4_CONV_CFG if fmt == "int4" else cfg
    model, x = cnn_and_input
    qmodel = quantized(model, cfg, x)
    path = export_onnx(qmodel, x, tmp_path / "cnn.onnx")
    assert stored in set(_weight_types(path).values())
    report = verify_onnx(path, qmodel, x, optimization=level)
    assert report.rel_error < 1e-4, report


def test_stored_int8_codes_decode_to_the_fake_quant_weight(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.INT8_DEFAULT_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "mlp.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    codes = next(v for k, v in inits.items() if k.startswith("2.weight_quantizer.codes")).astype(
        np.float64
    )
    scale = next(v for k, v in inits.items() if k.startswith("2.weight_quantizer.scale")).astype(
        np.float64
    )
    weight = (
        qmodel[2].weight.detach().double()
    )  # (out 128, in 256); stored as is (Gemm) or transposed (MatMul)
    decoded = (
        codes * scale[:, None] if codes.shape == tuple(weight.shape) else (codes * scale[None, :]).T
    )
    amax = weight.abs().amax(dim=1, keepdim=True)
    expected = torch.round(weight / (amax / 127)) * (amax / 127)  # float64 reference
    assert torch.allclose(torch.from_numpy(decoded), expected, atol=1e-6)


def test_int4_weight_only_file_is_under_a_third_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)
    ).eval()
    x = torch.randn(4, 512)
    with pytest.warns(UserWarning, match="no active quantizers"):
        fp32_path = export_onnx(model, x, tmp_path / "fp32.onnx")
    int4_path = export_onnx(
        quantized(model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, x), x, tmp_path / "int4.onnx"
    )
    assert os.path.getsize(int4_path) <= os.path.getsize(fp32_path) / 3
    graph = onnx.load(str(int4_path)).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(a.i == 128 for n in dq for a in n.attribute if a.name == "block_size")
    assert onnx.load(str(int4_path)).opset_import[0].version >= 21


def test_model_without_quantizers_exports_fp32_with_a_warning(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    with pytest.warns(UserWarning, match="plain fp32"):
        path = export_onnx(model, x, tmp_path / "fp32.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert verify_onnx(path, model, x).max_abs_error < 1e-5


def test_batch_axis_is_dynamic(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.INT8_DEFAULT_CFG, x)
    path = export_onnx(qmodel, x[:2], tmp_path / "mlp.onnx")
    big = torch.randn(13, 256)
    assert run_onnx(path, big)[0].shape == (13, 128)
    assert verify_onnx(path, qmodel, big).rel_error < 1e-4


def test_activation_dequantize_feeds_the_matmul_directly(cnn_and_input, tmp_path):
    model, x = cnn_and_input
    path = export_onnx(quantized(model, mtq.INT8_DEFAULT_CFG, x), x, tmp_path / "cnn.onnx")
    graph = onnx.load(str(path)).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dq_outputs = [n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq_outputs) == 6
    assert all(set(consumers[o]) <= {"Conv", "Gemm", "MatMul"} for o in dq_outputs)


def test_dynamic_per_tensor_int8_activations_fuse_into_integer_matmul(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    cfg = with_inputs(mtq.INT8_DEFAULT_CFG, {"num_bits": 8, "axis": None, "type": "dynamic"})
    x = x.reshape(2, 4, 256)  # 3-D input: the linears export as MatMul, which onnxruntime fuses
    qmodel = quantized(model, cfg, x)
    path = export_onnx(qmodel, x, tmp_path / "dyn.onnx")
    assert verify_onnx(path, qmodel, x, optimization="basic").rel_error < 1e-4
    _assert_exact_fused_or_saturation_named(path, qmodel, x)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in fused or "DynamicQuantizeMatMul" in fused


def test_per_token_fp8_activations_match_pytorch(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "fp8tok.onnx")
    assert verify_onnx(path, qmodel, x, optimization="basic").rel_error < 1e-4


def test_pre_quant_scale_is_exported_as_a_mul(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.INT8_DEFAULT_CFG, x)
    scale = torch.linspace(0.5, 2.0, 256)
    qmodel[0].input_quantizer.pre_quant_scale = scale
    path = export_onnx(qmodel, x, tmp_path / "pqs.onnx")
    assert "Mul" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert verify_onnx(path, qmodel, x).rel_error < 1e-4


def test_fp8_relu_bug_in_onnxruntime_all_level_is_what_basic_avoids(cnn_and_input, tmp_path):
    model, x = cnn_and_input
    qmodel = quantized(model, mtq.FP8_DEFAULT_CFG, x)
    path = export_onnx(qmodel, x, tmp_path / "fp8.onnx")
    from onnx.reference import ReferenceEvaluator

    reference = ReferenceEvaluator(str(path)).run(None, {"input_0": x.numpy()})[0]
    assert (
        np.abs(reference - run_onnx(path, x, "basic")[0]).max() < 1e-4
    )  # the graph itself is right


def test_nvfp4_for_onnxruntime_names_layer_and_format(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    qmodel = quantized(model, mtq.NVFP4_DEFAULT_CFG, x)
    with pytest.raises(UnsupportedFormatError, match=r"layer 0: .*e2m1.*onnxruntime"):
        export_onnx(qmodel, x, tmp_path / "nvfp4.onnx")
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_unwritable_path_fails_before_tracing(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(IsADirectoryError):
        export_onnx(model, x, tmp_path)
    assert calls == []


def test_existing_file_is_replaced_whole(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, x, target)
    onnx.checker.check_model(onnx.load(str(target)))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_format_table_names_match_stored_types():
    # every row's ONNX element type is the one its element's codes are stored as, and onnx's own
    # numpy (ml_dtypes) name for that type names the element: int8, int4, float8_e4m3fn, ...
    for name, spec in qk.FORMATS.items():
        if spec.onnx_dtype is None:
            continue
        assert spec.onnx_dtype == spec.element.onnx_dtype, name
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, spec.onnx_dtype))
        expected = spec.element.name if spec.element.is_int else spec.element.torch_dtype
        assert str(np_dtype) == expected.removesuffix("_x2"), name


def test_export_restores_each_module_training_flag(mlp_and_input, tmp_path):
    model, x = mlp_and_input
    model.train()
    model[1].eval()  # a mixed state, as a wrapper around an eval-mode model has
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, x, tmp_path / "m.onnx")
    assert [m.training for m in model] == [True, False, True]


def test_export_onnx_owns_the_graph_and_never_runs_core_qdq(mlp_and_input, tmp_path, monkeypatch):
    """export_onnx's markers decide the ONNX form: quant-core's Q/DQ path (for a plain
    torch.onnx.export) is not entered, even untraced inside a marker."""
    from quant_core.nn import onnx_qdq

    def refuse(*args):
        raise AssertionError("quant-core's Q/DQ path ran inside export_onnx")

    monkeypatch.setattr(onnx_qdq, "qdq", refuse)
    model, x = mlp_and_input
    for fmt in ("int8", "fp8"):
        cfg, _stored, level = FORMATS[fmt]
        qmodel = quantized(model, cfg, x)
        path = export_onnx(qmodel, x, tmp_path / f"{fmt}.onnx")
        report = verify_onnx(path, qmodel, x, optimization=level)
        assert report.rel_error < 1e-4, report


def _assert_exact_fused_or_saturation_named(path, model, x):
    """At optimization "all" onnxruntime fuses Q/DQ into integer matmuls: exact on CPUs whose
    kernel does not saturate, and on the others verify_onnx names the saturation."""
    if not ort_integer_matmul_saturates():
        assert verify_onnx(path, model, x).rel_error < 1e-4
        return
    with pytest.warns(UserWarning, match="saturates on this CPU"):
        assert verify_onnx(path, model, x).rel_error > 1e-3


def test_saturation_probe_matches_a_saturating_integer_graph(mlp_and_input, tmp_path):
    """Weights and activations that fill the int8 range: the fused run is exact iff the probe says
    onnxruntime does not saturate here, and verify_onnx names the saturation otherwise."""
    model, x = mlp_and_input
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(model[0].weight))  # every weight code is +-127
    x = x.abs().reshape(2, 4, 256) + 1.0  # every activation code near 127
    cfg = with_inputs(mtq.INT8_DEFAULT_CFG, {"num_bits": 8, "axis": None})
    qmodel = quantized(model, cfg, x)
    path = export_onnx(qmodel, x, tmp_path / "full_range.onnx")
    assert verify_onnx(path, qmodel, x, optimization="basic").rel_error < 1e-4
    _assert_exact_fused_or_saturation_named(path, qmodel, x)

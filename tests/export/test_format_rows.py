"""Every row of the format table, walked through the whole chain: fake quantization -> codes ->
each exporter. An exporter either holds the row (its consumer decodes exactly the fake-quantized
weight) or refuses it with UnsupportedFormatError; a row an exporter cannot hold never exports
silently wrong."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from hf_decode import dequantize_hf
from onnx.reference import ReferenceEvaluator
from torch import nn

import quant_core as mtq
import quant_kernels as qk
from quant_export import UnsupportedFormatError, export_onnx
from quant_export.hf_formats import export_linear
from quant_export.quantizers import spec_of

# Rows each exporter holds (as weights of a Linear); every other row must be refused.
ONNX_ROWS = {"INT8", "INT8_BLOCK", "INT4", "INT4_BLOCK64", "FP8", "FP8_PER_CHANNEL", "FP8_BLOCK"}
ONNX_ROWS |= {"FP8_E5M2", "FP4", "NVFP4"}
HF_ROWS = {"INT8", "INT4", "INT4_BLOCK64", "FP8", "FP8_PER_CHANNEL", "NVFP4"}


def _attributes(row: qk.FormatSpec, **update) -> dict:
    """The quantizer attributes that describe ``row`` (static)."""
    attrs = {"num_bits": row.num_bits, "axis": row.axis, "enable": True}
    if row.block_sizes:
        attrs["block_sizes"] = dict(row.block_sizes)
        if row.scale_bits:
            attrs["block_sizes"]["scale_bits"] = row.scale_bits
    return {**attrs, **update}


def _layer(row: qk.FormatSpec, input_attrs: dict | None = None) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32)).eval()
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": _attributes(row),
            "*input_quantizer": input_attrs or {"enable": False},
        },
        "algorithm": "max",
    }
    mtq.quantize(model, cfg, lambda m: m(torch.randn(8, 256)))
    return model


def _fake_quantized_weight(layer: nn.Linear) -> torch.Tensor:
    with torch.no_grad():
        return layer.weight_quantizer(layer.weight)


@pytest.mark.parametrize("name", list(qk.FORMATS))
def test_row_parses_back_and_its_codes_decode_to_the_fake_quantized_weight(name):
    row = qk.FORMATS[name]
    layer = _layer(row)[0]
    fmt = layer.weight_quantizer.format
    assert fmt.row is row and fmt.name == name and fmt.effective_bits == row.effective_bits
    fq = _fake_quantized_weight(layer)
    spec = spec_of("w", layer.weight_quantizer)
    qt = spec.codes(layer.weight.detach(), {a % 2: b for a, b in spec.blocks.items()})
    assert torch.equal(qt.dequantize(), fq)
    # every code is a finite value of the element's own code table, inside the format's bounds
    table = qt.element.values()
    packed_as_bits = qt.codes.dtype == torch.uint8 and not qt.element.is_int
    decoded = table[qt.codes.long()] if packed_as_bits else qt.codes.double()
    assert torch.isin(decoded, table[table.isfinite()]).all()
    lo, hi = fmt.bounds
    assert decoded.min() >= lo and decoded.max() <= hi and decoded.abs().max() > 0
    if row.storage_dtype is not None:
        assert qt.packed_codes().dtype == getattr(torch, row.storage_dtype)


def _onnx_outcome(model: nn.Module, tmp_path) -> np.ndarray | None:
    x = torch.randn(4, 256)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_onnx(model, x, tmp_path / "m.onnx")
    except UnsupportedFormatError:
        return None
    graph = ReferenceEvaluator(onnx.load(str(path)))  # onnx's own reference implementation
    got = graph.run(None, {graph.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    float_out = torch.nn.functional.linear(x, model[0].weight, model[0].bias).detach().numpy()
    assert np.abs(got - float_out).max() > 1e-3  # the stored weight really is quantized
    return got


@pytest.mark.parametrize("name", list(qk.FORMATS))
def test_onnx_export_holds_or_refuses_each_row(name, tmp_path):
    held = _onnx_outcome(_layer(qk.FORMATS[name]), tmp_path) is not None
    assert held == (name in ONNX_ROWS)


def _input_choices(row: qk.FormatSpec) -> list[dict]:
    """Input quantizers to pair with a row's weights: none, per-tensor static and per-token dynamic
    in the row's element format, and the row's own format (dynamic blocks)."""
    same = {"num_bits": row.num_bits, "enable": True}
    choices = [{"enable": False}, {**same, "axis": None}]
    choices.append({**same, "type": "dynamic", "block_sizes": {-1: None}})
    if row.block_sizes:
        choices.append(_attributes(row, axis=None) | {"type": "dynamic"})
    return choices


@pytest.mark.parametrize("name", list(qk.FORMATS))
def test_hf_export_holds_or_refuses_each_row(name):
    row = qk.FORMATS[name]
    algos = set()
    for input_attrs in _input_choices(row):
        model = _layer(row, input_attrs)
        try:
            exported = export_linear("layer", model[0])
        except UnsupportedFormatError:
            continue
        algos.add(exported.quant_algo)
        fq = _fake_quantized_weight(model[0]).float()
        ref = dequantize_hf(exported.quant_algo, exported.tensors, exported.group_size)
        ulp = (torch.nextafter(fq.abs(), torch.tensor(math.inf)) - fq.abs()).double()
        assert ((ref - fq.double()).abs() <= ulp).all(), exported.quant_algo
    assert bool(algos) == (name in HF_ROWS), algos
    if algos:  # the row's TensorRT-LLM / ModelOpt algorithm name is one the exporter writes
        assert row.trtllm_quant_algo in algos, (row.trtllm_quant_algo, algos)

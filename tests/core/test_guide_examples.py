"""ModelOpt's PyTorch quantization guide, example by example, with only the import line changed.

``import modelopt.torch.quantization as mtq`` becomes ``import quant_core as mtq`` (and
``mto.save``/``mto.restore`` become ``mtq.save``/``mtq.restore``). ModelOpt 0.47 itself fails three
of these on a CPU: the ONNX export with torch's default (dynamo) exporter, the dict edit of a
built-in config, and registering a user QuantLayerNorm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyTransformer
from torch import nn

import quant_core as mtq
from quant_core.config import QuantizerAttributeConfig
from quant_core.nn import QuantLinear, TensorQuantizer


def forward_loop_for(data_loader):
    def forward_loop(model):
        for batch in data_loader:
            model(batch)

    return forward_loop


def test_ptq_with_int8_smoothquant(transformer, tokens):
    reference = transformer(tokens[0])
    model = transformer
    config = mtq.INT8_SMOOTHQUANT_CFG
    data_loader = tokens

    def forward_loop(model):
        for batch in data_loader:
            model(batch)

    model = mtq.quantize(model, config, forward_loop)

    assert isinstance(model.fc1, QuantLinear)
    assert (
        model.fc1.input_quantizer.amax is not None and model.fc1.input_quantizer.amax.numel() == 1
    )
    assert model.fc1.weight_quantizer.amax.shape[0] == 64  # per output channel
    out = model(tokens[0])
    cosine = F.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert 0.98 < cosine < 1.0  # quantized (not identical) yet close


def test_print_quant_summary_lists_every_quantizer(transformer, tokens, capsys):
    model = mtq.quantize(transformer, mtq.INT8_DEFAULT_CFG, forward_loop_for(tokens))
    mtq.print_quant_summary(model)
    out = capsys.readouterr().out
    assert "fc1.input_quantizer" in out and "fc1.weight_quantizer" in out
    row = next(line for line in out.splitlines() if line.startswith("fc1.weight_quantizer"))
    assert "INT8" in row and "per-channel (axis 0)" in row and "yes" in row
    amax = model.fc1.weight_quantizer.amax
    assert f"{float(amax.min()):.4g}" in row and f"{float(amax.max()):.4g}" in row
    out_row = next(line for line in out.splitlines() if line.startswith("fc1.output_quantizer"))
    assert out_row.rstrip().endswith("no")
    n_quantizers = sum(isinstance(m, TensorQuantizer) for m in model.modules())
    assert f"{n_quantizers} quantizers" in out


@pytest.mark.parametrize("cfg_name", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_onnx_export_gives_standard_qdq_that_onnxruntime_runs(cfg_name, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = [torch.randn(4, 16) for _ in range(4)]
    model = mtq.quantize(model, getattr(mtq, cfg_name), forward_loop_for(calib))
    sample_input = torch.randn(4, 16)
    onnx_file = str(tmp_path / "model.onnx")

    torch.onnx.export(model, sample_input, onnx_file)

    graph = onnx.load(onnx_file).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4
    init = {t.name: t for t in graph.initializer}
    zero_point_types = {
        init[n.input[2]].data_type
        for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[2] in init
    }
    expected = (
        onnx.TensorProto.INT8 if cfg_name == "INT8_DEFAULT_CFG" else onnx.TensorProto.FLOAT8E4M3FN
    )
    assert zero_point_types == {expected}
    options = ort.SessionOptions()
    # onnxruntime's extended CPU graph optimizations change FP8 Q/DQ results; basic level keeps them exact.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(onnx_file, options)
    (got,) = session.run(None, {session.get_inputs()[0].name: sample_input.numpy()})
    expected_out = model(sample_input).detach().numpy()
    assert abs(got - expected_out).max() < 1e-5


def test_qat_loop_lowers_training_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    x_train = torch.randn(256, 8)
    y_train = teacher(x_train).detach()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    calib_set = [x_train[:64]]

    config = mtq.INT8_DEFAULT_CFG

    def forward_loop(model):
        for data in calib_set:
            model(data)

    model = mtq.quantize(model, config, forward_loop)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_now():
        with torch.no_grad():
            return F.mse_loss(model(x_train), y_train).item()

    before = loss_now()
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x_train), y_train)
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[0].weight_quantizer.is_enabled and model[0].input_quantizer.is_enabled
    assert after < 0.2 * before


def test_tensor_quantizer_examples(recwarn):
    x = torch.randn(4, 256, dtype=torch.float32)

    # Create quantizer module with default quantization parameters
    quantizer = TensorQuantizer()
    quant_x = quantizer(x)  # Quantize input x

    # Example setting for INT4 block-wise quantization
    quantizer_custom = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={-1: 128}))
    quant_x_custom = quantizer_custom(x)

    # Never calibrated: each warns once and uses the input's own amax (float64 references).
    x64 = x.double()
    scale = x64.abs().max() / 127
    ref = torch.clamp(torch.round(x64 / scale), -128, 127) * scale
    assert torch.allclose(quant_x.double(), ref, rtol=1e-6, atol=0)  # float32 math vs float64
    blocks = x64.reshape(4, 2, 128)
    scale4 = blocks.abs().amax(-1, keepdim=True) / 7
    ref4 = (torch.clamp(torch.round(blocks / scale4), -8, 7) * scale4).reshape(4, 256)
    assert torch.allclose(quant_x_custom.double(), ref4, rtol=1e-6, atol=0)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert sum("never calibrated" in m for m in messages) == 2
    quantizer(x)
    assert sum("never calibrated" in str(w.message) for w in recwarn) == 2  # once per quantizer


def test_config_copy_and_edit_enables_bmm_output_quantizer(tokens):
    config = mtq.INT8_DEFAULT_CFG.copy()
    config["quant_cfg"]["*.bmm.output_quantizer"] = {"enable": True}
    config["quant_cfg"]["*input_quantizer"]["enable"] = False
    config["quant_cfg"]["*fc2.*"] = {"enable": False}

    model = mtq.quantize(TinyTransformer().eval(), config, forward_loop_for(tokens))

    assert (
        model.attn.bmm.output_quantizer.is_enabled
        and model.attn.bmm.output_quantizer.amax is not None
    )
    assert not model.attn.bmm2.output_quantizer.is_enabled
    assert not model.fc1.input_quantizer.is_enabled and model.fc1.weight_quantizer.is_enabled
    assert not model.fc2.weight_quantizer.is_enabled
    # The built-in constant is untouched, so the next user gets the original INT8 config.
    assert "*.bmm.output_quantizer" not in mtq.INT8_DEFAULT_CFG["quant_cfg"]
    assert "*fc2.*" not in mtq.INT8_DEFAULT_CFG["quant_cfg"]
    assert mtq.INT8_DEFAULT_CFG["quant_cfg"]["*input_quantizer"] == {"num_bits": 8, "axis": None}
    fresh = mtq.quantize(TinyTransformer().eval(), mtq.INT8_DEFAULT_CFG, forward_loop_for(tokens))
    assert not fresh.attn.bmm.output_quantizer.is_enabled and fresh.fc1.input_quantizer.is_enabled
    deep = copy.deepcopy(mtq.INT4_AWQ_CFG)
    deep["quant_cfg"]["*lm_head*"] = {"enable": True}
    assert mtq.INT4_AWQ_CFG["quant_cfg"]["*lm_head*"] == {"enable": False}


class QuantLayerNorm(nn.LayerNorm):
    def __init__(self, normalized_shape):
        super().__init__(normalized_shape)
        self._setup()

    def _setup(self):
        # Method to setup the quantizers
        self.input_quantizer = TensorQuantizer()
        self.weight_quantizer = TensorQuantizer()

    def forward(self, input):
        input = self.input_quantizer(input)
        weight = self.weight_quantizer(self.weight)
        return F.layer_norm(input, self.normalized_shape, weight, self.bias, self.eps)


def test_user_quant_layernorm_is_registered_and_used(transformer, tokens):
    norm = transformer.norm
    weight_before = norm.weight
    mtq.register(original_cls=nn.LayerNorm, quantized_cls=QuantLayerNorm)
    try:
        model = mtq.quantize(transformer, mtq.INT8_DEFAULT_CFG, forward_loop_for(tokens))
    finally:
        mtq.unregister(nn.LayerNorm)
    assert model.norm is norm and isinstance(norm, QuantLayerNorm)
    assert norm.weight is weight_before  # converted in place, same parameter
    assert norm.input_quantizer.is_enabled and norm.input_quantizer.amax is not None
    assert (
        norm.weight_quantizer.attribute_config.axis == 0
    )  # the config's *weight_quantizer entry applied


class MyQuantLinear(QuantLinear):
    """A user's own quantized Linear replacing the library mapping."""


def test_user_registration_wins_over_library_mapping_even_after_plugins(transformer, tokens):
    mtq.register(original_cls=nn.Linear, quantized_cls=MyQuantLinear)
    try:
        model = mtq.quantize(transformer, mtq.INT8_DEFAULT_CFG, forward_loop_for(tokens))
        assert type(model.fc1) is MyQuantLinear
    finally:
        mtq.unregister(nn.Linear)
    again = mtq.quantize(TinyTransformer().eval(), mtq.INT8_DEFAULT_CFG, forward_loop_for(tokens))
    assert type(again.fc1) is QuantLinear


def test_fold_weight_keeps_outputs(transformer, tokens):
    quantized_model = mtq.quantize(
        transformer, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, forward_loop_for(tokens)
    )
    before = quantized_model(tokens[0])

    mtq.fold_weight(quantized_model)

    after = quantized_model(tokens[0])
    assert torch.equal(before, after)
    assert not quantized_model.fc1.weight_quantizer.is_enabled
    levels = quantized_model.fc1.weight.detach().reshape(64, -1).unique(dim=None)
    assert levels.numel() <= 64 * 16  # at most 16 INT4 levels per block (one block per row here)


def test_save_and_restore_like_mto(transformer, tokens, tmp_path):
    model = mtq.quantize(transformer, mtq.INT8_SMOOTHQUANT_CFG, forward_loop_for(tokens))
    mtq.save(model, tmp_path / "model.safetensors")
    fresh = TinyTransformer().eval()
    mtq.restore(fresh, tmp_path / "model.safetensors")
    assert torch.equal(fresh(tokens[1]), model(tokens[1]))

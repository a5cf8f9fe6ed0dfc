"""ModelOpt 0.47's module paths and model-level helpers, checked against ModelOpt's documented behaviour.

Expected values come from ModelOpt 0.47.0's docstrings and source (``modelopt/torch/quantization/
conversion.py``, ``model_quant.py``, ``config.py``, ``tensor_quant.py``, ``utils/core_utils.py``) and
independent float64 references; ModelOpt itself is not installed in the test environment.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import quant_core as mtq
import quant_kernels as qk

MODELOPT_PATHS = {
    "config": ["QuantizerAttributeConfig", "MaxCalibConfig", "normalize_quant_cfg_list"],
    "nn": ["QuantLinear", "TensorQuantizer", "SequentialQuantizer", "QuantModuleRegistry"],
    "nn.modules": ["QuantEmbedding", "QuantMaxPool2d", "QuantInstanceNorm1d"],
    "nn.modules.quant_linear": ["QuantLinear", "Linear"],
    "nn.modules.quant_conv": ["QuantConv2d", "Conv2d"],
    "nn.modules.quant_module": ["QuantModule", "QuantInputBase", "QuantLinearConvBase"],
    "nn.modules.tensor_quantizer": ["TensorQuantizer", "SequentialQuantizer"],
    "nn.modules.quant_pooling": ["AvgPool2d", "QuantAdaptiveAvgPool3d"],
    "calib": ["MaxCalibrator", "HistogramCalibrator"],
    "tensor_quant": ["fake_tensor_quant", "scaled_e4m3", "QUANT_DESC_8BIT_PER_TENSOR"],
    "model_calib": ["max_calibrate", "smoothquant", "awq", "svdquant"],
    "model_quant": [
        "quantize",
        "calibrate",
        "compute_quantization_mse",
        "temporarily_fold_weights",
    ],
    "conversion": [
        "replace_quant_module",
        "set_quantizer_attributes_full",
        "set_quantizer_attributes_partial",
        "set_quantizer_by_cfg_context",
        "preserve_quantizer_attributes_context",
    ],
    "utils": ["is_quantized", "reduce_amax", "update_quant_cfg_with_kv_cache_quant"],
    "opt": ["save", "restore", "modelopt_state", "restore_from_modelopt_state"],
}

# The 27 public functions of ModelOpt 0.47's mtq, less compress / auto_quantize /
# get_auto_quantize_config (their own issues) and pydantic's re-exported decorators.
MODELOPT_FUNCTIONS = [
    "calibrate",
    "compute_quantization_mse",
    "disable_quantizer",
    "enable_quantizer",
    "find_quant_cfg_entry_by_path",
    "fold_weight",
    "load_config",
    "need_calibration",
    "normalize_quant_cfg_list",
    "postprocess_amax",
    "preserve_quantizer_attributes_context",
    "print_quant_summary",
    "quantize",
    "register",
    "replace_quant_module",
    "set_quantizer_attribute",
    "set_quantizer_attributes_full",
    "set_quantizer_attributes_partial",
    "set_quantizer_by_cfg",
    "set_quantizer_by_cfg_context",
    "temporarily_fold_weights",
    "unregister",
    "update_quant_cfg_with_kv_cache_quant",
]


@pytest.mark.parametrize("path", sorted(MODELOPT_PATHS))
def test_modelopt_submodule_paths_import_with_their_names(path: str) -> None:
    module = importlib.import_module(f"quant_core.{path}")
    missing = [n for n in MODELOPT_PATHS[path] if not hasattr(module, n)]
    assert not missing, f"quant_core.{path} lacks {missing}"


def test_every_modelopt_mtq_function_is_present() -> None:
    assert [n for n in MODELOPT_FUNCTIONS if not callable(getattr(mtq, n, None))] == []


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=gen) for _ in range(3)]


def _int8_ref(x: torch.Tensor, amax: torch.Tensor, qmin: int = -128) -> torch.Tensor:
    """Symmetric INT8 fake quantization in float64: round-half-even(x / (amax/127)), clamped."""
    scale = amax.double() / 127
    return (torch.round(x.double() / scale).clamp(qmin, 127) * scale).float()


def test_set_quantizer_attributes_partial_broadcasts_a_dict_to_every_stage() -> None:
    model = _mlp()
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": [{"num_bits": 4, "block_sizes": {-1: 8}}, {"num_bits": (4, 3)}],
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
    mtq.quantize(model, cfg)
    mtq.set_quantizer_attributes_partial(model, "*weight_quantizer", {"narrow_range": True})
    stages = list(model[0].weight_quantizer)
    assert [q.narrow_range for q in stages] == [True, True]
    assert stages[0].num_bits == 4 and stages[1].num_bits == (4, 3)  # the rest untouched
    with pytest.raises(ValueError, match="SequentialQuantizer"):
        mtq.set_quantizer_attributes_partial(model, "*input_quantizer", [{"num_bits": 4}])


def test_set_quantizer_attributes_full_resets_unnamed_fields_to_defaults() -> None:
    model = _mlp()
    mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG)
    mtq.set_quantizer_attributes_partial(model, "0.weight_quantizer", {"narrow_range": True})
    full = mtq.QuantizerAttributeConfig(num_bits=4, axis=None)
    mtq.set_quantizer_attributes_full(model, "*weight_quantizer", full, parent_class=nn.Linear)
    q = model[0].weight_quantizer
    assert (q.num_bits, q.axis, q.narrow_range) == (4, None, False)
    with pytest.raises(ValueError, match="QuantizerAttributeConfig"):
        mtq.set_quantizer_attributes_full(model, "*weight_quantizer", {"num_bits": 4})
    mtq.set_quantizer_attributes_full(model, "0.weight_quantizer", [full, full])
    assert isinstance(model[0].weight_quantizer, mtq.SequentialQuantizer)


def test_set_quantizer_by_cfg_context_restores_attributes_and_amax() -> None:
    model, data = _mlp(), _batches()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: [m(x) for x in data])
    before = model(data[0])
    amax = model[0].weight_quantizer.amax.clone()
    with mtq.set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}]):
        torch.testing.assert_close(model(data[0]), _mlp()(data[0]), rtol=0, atol=0)
    assert torch.equal(model(data[0]), before)
    with mtq.set_quantizer_by_cfg_context(
        model, {"*weight_quantizer": {"num_bits": 4, "axis": None}}
    ):
        assert model[0].weight_quantizer.amax is None  # new format, amax dropped
    assert torch.equal(model[0].weight_quantizer.amax, amax)
    assert torch.equal(model(data[0]), before)
    with (
        pytest.raises(ValueError, match="single-config"),
        mtq.set_quantizer_by_cfg_context(model, {"*weight_quantizer": [{"num_bits": 4}]}),
    ):
        pass


def test_temporarily_fold_weights_folds_then_restores_in_place() -> None:
    model, data = _mlp(), _batches()
    original = model[0].weight.detach().clone()
    mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG)
    param = model[0].weight
    amax = original.abs().amax(dim=1, keepdim=True)
    with mtq.temporarily_fold_weights(model, snapshot_device="cpu"):
        torch.testing.assert_close(
            model[0].weight.detach(), _int8_ref(original, amax), rtol=0, atol=1e-6
        )
        assert not model[0].weight_quantizer.is_enabled
    assert model[0].weight is param and torch.equal(param.detach(), original)
    assert model[0].weight_quantizer.is_enabled
    out = model(data[0])
    ref = nn.functional.linear(data[0], _int8_ref(original, amax), model[0].bias)
    torch.testing.assert_close(out[:, :0], ref[:, :0])
    torch.testing.assert_close(model[0](data[0]), ref, rtol=1e-5, atol=1e-5)


def test_compute_quantization_mse_matches_a_float64_reference() -> None:
    model, data = _mlp(), _batches()
    cfg = {
        "quant_cfg": {
            "*input_quantizer": {"num_bits": 8, "axis": None},
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
    mtq.quantize(model, cfg, lambda m: [m(x) for x in data])
    mse = mtq.compute_quantization_mse(model, lambda m: m(data[0]), wildcards="0.input_quantizer")
    amax = model[0].input_quantizer.amax
    ref = float(((_int8_ref(data[0], amax).double() - data[0].double()) ** 2).mean())
    assert list(mse) == ["0.input_quantizer"]
    assert mse["0.input_quantizer"] == pytest.approx(ref, rel=1e-5)
    assert "0.weight_quantizer" not in mtq.compute_quantization_mse(model, lambda m: m(data[0]))


def test_forward_loop_without_argument_is_accepted_with_a_deprecation_warning() -> None:
    model, data = _mlp(), _batches()
    with pytest.warns(DeprecationWarning, match="forward_loop"):
        mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda: [model(x) for x in data])
    expected = max(float(x.abs().max()) for x in data)
    assert float(model[0].input_quantizer.amax) == pytest.approx(expected)


def test_replace_quant_module_inserts_quantizers_without_a_config() -> None:
    model = _mlp()
    mtq.replace_quant_module(model)
    assert isinstance(model[0], mtq.nn.QuantLinear) and mtq.utils.is_quantized(model)
    assert model[
        0
    ].weight_quantizer.is_enabled  # ModelOpt's default descriptors: INT8 per-row weights
    assert model[0].weight_quantizer.axis == 0 and model[0].input_quantizer.axis is None
    with pytest.raises(ValueError, match="already quantized"):
        mtq.replace_quant_module(model)


def test_quantize_refuses_a_module_whose_forward_was_replaced_on_the_instance() -> None:
    model = _mlp()
    model[2].forward = lambda x: x @ model[2].weight.t()
    with pytest.raises(ValueError, match=r"'2'.*forward replaced"):
        mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG)
    assert not mtq.utils.is_quantized(model)  # refused before converting anything


def test_accelerate_hooked_module_runs_its_quantizers() -> None:
    hooks = pytest.importorskip("accelerate.hooks")  # absent in the quant-core-only session
    ModelHook, add_hook_to_module = hooks.ModelHook, hooks.add_hook_to_module

    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    model, data = _mlp(), _batches()
    add_hook_to_module(model[0], Count())
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: [m(x) for x in data])
    assert model[0].input_quantizer.amax is not None  # the quantized forward ran under the hook
    calls.clear()
    amax = model[0].weight.detach().abs().amax(1, keepdim=True)
    x_q = _int8_ref(data[0], model[0].input_quantizer.amax)
    ref = nn.functional.linear(x_q, _int8_ref(model[0].weight.detach(), amax), model[0].bias)
    torch.testing.assert_close(model[0](data[0]), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_direct_construction_creates_quantizers_and_applies_descriptors() -> None:
    lin = mtq.nn.QuantLinear(8, 8)
    assert lin.weight_quantizer.axis == 0 and not lin.output_quantizer.is_enabled
    desc_in = mtq.tensor_quant.QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR
    conv = mtq.nn.QuantConv2d(3, 4, 3, quant_desc_input=desc_in, quant_desc_weight={"num_bits": 4})
    assert conv.input_quantizer.unsigned and conv.weight_quantizer.num_bits == 4
    model = nn.Sequential(conv)
    state = mtq.opt.modelopt_state(model)
    assert state["modules"]["0"]["original"] == "nn.Conv2d"


def test_quant_embedding_quantizes_the_table() -> None:
    torch.manual_seed(0)
    emb = mtq.nn.QuantEmbedding(10, 4)
    ids = torch.tensor([[1, 3, 9]])
    table = emb.weight.detach()
    ref = _int8_ref(table, table.abs().max())[ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # uncalibrated: dynamic amax
        torch.testing.assert_close(emb(ids), ref)
    assert not hasattr(emb, "input_quantizer")


def test_extra_modules_register_for_norms_and_pooling() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.AvgPool1d(2))
    for original in (nn.LayerNorm, nn.AvgPool1d):
        mtq.register(original, mtq.nn.modules.EXTRA_MODULES[original])
    try:
        data = [torch.randn(2, 4, 8)]
        cfg = {"quant_cfg": {"*input_quantizer": {"num_bits": 8, "axis": None}}, "algorithm": "max"}
        mtq.quantize(model, cfg, lambda m: [m(x) for x in data])
        w, b = model[0].weight, model[0].bias
        amax2 = nn.functional.layer_norm(data[0], (8,), w, b).abs().max()  # calibrated unquantized
        normed = nn.functional.layer_norm(_int8_ref(data[0], data[0].abs().max()), (8,), w, b)
        ref = nn.functional.avg_pool1d(_int8_ref(normed, amax2), 2)
        torch.testing.assert_close(model(data[0]), ref, rtol=1e-5, atol=1e-5)
    finally:
        for original in (nn.LayerNorm, nn.AvgPool1d):
            mtq.unregister(original)


def test_fake_tensor_quant_uses_narrow_range_by_default() -> None:
    x = torch.tensor([-2.0, -1.0, -0.004, 0.5, 1.0])
    out = mtq.tensor_quant.fake_tensor_quant(x, torch.tensor(1.0))
    torch.testing.assert_close(out, _int8_ref(x, torch.tensor(1.0), qmin=-127))
    assert float(out[0]) == -1.0  # [-127, 127]: -2 saturates at -amax
    wide = mtq.tensor_quant.fake_tensor_quant(x, torch.tensor(1.0), narrow_range=False)
    assert float(wide[0]) == pytest.approx(-128 / 127)


def test_scaled_e4m3_matches_a_torch_float8_cast() -> None:
    x = torch.linspace(-3, 3, 97)
    amax = torch.tensor(2.5)
    scale = 448.0 / amax
    ref = (x.clamp(-amax, amax) * scale).to(torch.float8_e4m3fn).float() / scale
    torch.testing.assert_close(mtq.tensor_quant.scaled_e4m3(x, amax, None, 4, 3), ref)
    with pytest.raises(ValueError, match="E=4, M=3"):
        mtq.tensor_quant.scaled_e4m3(x, amax, None, 5, 2)


def test_reduce_amax_on_float8_tensors_on_cpu() -> None:
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]]).to(torch.float8_e4m3fn)
    assert float(qk.reduce_amax(x)) == 3.0
    assert qk.reduce_amax(x, axis=0).flatten().tolist() == [3.0, 2.0]
    # ModelOpt's utils.reduce_amax: axis names the dims reduced; a scalar result is 0-d.
    assert mtq.utils.reduce_amax(x, axis=1).flatten().tolist() == [3.0, 2.0]
    assert mtq.utils.reduce_amax(x).shape == ()


def test_opt_save_restore_and_modelopt_state_round_trip(tmp_path) -> None:
    model, data = _mlp(), _batches()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: [m(x) for x in data])
    expected = model(data[1])
    mtq.opt.save(model, tmp_path / "m.safetensors")
    restored = mtq.opt.restore(_mlp(), tmp_path / "m.safetensors")
    assert torch.equal(restored(data[1]), expected)
    torch.save(mtq.opt.modelopt_state(model), tmp_path / "state.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fresh = mtq.opt.restore_from_modelopt_state(_mlp(), modelopt_state_path=tmp_path / "state.pt")
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert torch.equal(fresh(data[1]), expected)
    with pytest.raises(TypeError, match="file path"):
        mtq.opt.save(model, open(tmp_path / "f", "wb"))  # noqa: SIM115
    with pytest.raises(TypeError, match="model instance"):
        mtq.opt.restore(nn.Linear, tmp_path / "m.safetensors")


def test_model_calib_functions_run_their_algorithm() -> None:
    model, data = _mlp(), _batches()
    mtq.quantize(model, {**mtq.INT8_DEFAULT_CFG.copy(), "algorithm": None})
    mtq.model_calib.max_calibrate(model, lambda m: [m(x) for x in data])
    expected = max(float(x.abs().max()) for x in data)
    assert float(model[0].input_quantizer.amax) == pytest.approx(expected)
    with pytest.raises(ValueError, match="awq_lite, awq_clip or awq_full"):
        mtq.model_calib.awq(model, None, algorithm="awq")
    assert copy.deepcopy(model) is not model

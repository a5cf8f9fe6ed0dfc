"""ModelOpt 0.47's module-level API pieces: ``QuantModuleRegistry.convert`` / ``[cls]``, its module
paths, ``default_quant_desc_*`` class attributes, ``tensor_quant.fake_tensor_quant`` held as a
class attribute, float64 inputs, and ``calib.calibrate_weights``."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core import tensor_quant
from quant_core.calib import calibrate_weights
from quant_core.nn import QuantLinear, QuantModuleRegistry


def test_registry_convert_turns_one_module_into_its_quantized_class_in_place() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    weight, bias = linear.weight, linear.bias
    converted = QuantModuleRegistry.convert(linear)
    assert converted is linear and type(linear) is QuantLinear
    assert linear.weight is weight and linear.bias is bias  # the same parameters, no copies
    assert linear.weight_quantizer.num_bits == 8 and linear.weight_quantizer.axis == 0
    assert linear.input_quantizer.is_enabled and not linear.output_quantizer.is_enabled
    assert QuantModuleRegistry[nn.Linear] is QuantLinear
    with pytest.raises(ValueError, match="already a quantized module"):
        QuantModuleRegistry.convert(linear)
    with pytest.raises(KeyError, match="'GELU' is not registered"):
        QuantModuleRegistry.convert(nn.GELU())
    with pytest.raises(KeyError, match="GELU"):
        QuantModuleRegistry[nn.GELU]


def test_a_converted_module_quantizes_like_one_quantize_converted() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    a = nn.Linear(8, 4)
    b = nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    mtq.quantize(nn.Sequential(a), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    QuantModuleRegistry.convert(b)
    mtq.calibrate(b, "max", lambda m: m(x))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("nn.modules.quant_instancenorm", ["QuantInstanceNorm1d", "QuantInstanceNorm2d"]),
        ("nn.modules.quant_batchnorm", ["QuantBatchNorm1d", "QuantBatchNorm3d"]),
        ("nn.modules.quant_layernorm", ["QuantLayerNorm"]),
        ("nn.functional", ["normalized_hadamard_transform"]),
    ],
)
def test_modelopt_module_paths(path: str, names: list[str]) -> None:
    module = importlib.import_module(f"quant_core.{path}")
    for name in names:
        assert name in module.__all__ and getattr(module, name) is not None
    if path == "nn.functional":
        x = torch.randn(3, 16)
        y = module.normalized_hadamard_transform(x)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthonormal


def test_default_quant_desc_class_attributes_are_honoured(monkeypatch) -> None:
    assert QuantLinear.default_quant_desc_weight.axis == 0
    assert QuantLinear.default_quant_desc_input.axis is None
    monkeypatch.setattr(QuantLinear, "default_quant_desc_weight", {"num_bits": 4, "axis": None})
    monkeypatch.setattr(
        QuantLinear, "default_quant_desc_input", mtq.QuantizerAttributeConfig(num_bits=(4, 3))
    )
    converted = QuantModuleRegistry.convert(nn.Linear(8, 4))
    assert converted.weight_quantizer.num_bits == 4 and converted.weight_quantizer.axis is None
    assert converted.input_quantizer.num_bits == (4, 3)
    built = QuantLinear(8, 4)  # built directly too
    assert built.weight_quantizer.num_bits == 4


def test_fake_tensor_quant_held_as_a_class_attribute_is_not_bound() -> None:
    class Clip(nn.Module):
        quant = tensor_quant.fake_tensor_quant
        fp8 = tensor_quant.scaled_e4m3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fp8(self.quant(x, torch.tensor(2.0)), torch.tensor(2.0))

    x = torch.linspace(-3, 3, 50)
    expected = tensor_quant.scaled_e4m3(tensor_quant.fake_tensor_quant(x, torch.tensor(2.0)), 2.0)
    assert torch.equal(Clip()(x), expected)
    # the INT8 grid with narrow range: 2 / 127 steps, clipped at +-2
    assert float(tensor_quant.fake_tensor_quant(x, 2.0).abs().max()) == pytest.approx(2.0)


def test_float64_input_is_refused_naming_the_quantizer() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).double()
    mtq.quantize(model, {**mtq.INT8_DEFAULT_CFG.copy(), "algorithm": None})
    with pytest.raises(ValueError, match=r"quantizer 0\.input_quantizer got a float64 input"):
        model(torch.randn(2, 4, dtype=torch.float64))


def _weight_quantized(axis: int | None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ConvTranspose2d(4, 6, 3))
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "0.weight_quantizer", "cfg": {"num_bits": 8, "axis": axis}},
            {
                "quantizer_name": "1.weight_quantizer",
                "cfg": {"num_bits": 8, "axis": None if axis is None else 1},
            },
        ],
        "algorithm": None,
    }
    return mtq.quantize(model, config)


def test_calibrate_weights_per_channel_percentile_max_and_mse() -> None:
    model = _weight_quantized(axis=0)
    calibrate_weights(model, "percentile", percentile=100)
    w = model[0].weight.detach()
    assert model[0].weight_quantizer.amax.shape == (8, 1)
    torch.testing.assert_close(model[0].weight_quantizer.amax.flatten(), w.abs().amax(1))
    # transposed convolution: one amax per output channel, axis 1
    t = model[1].weight.detach()
    assert model[1].weight_quantizer.amax.shape == (1, 6, 1, 1)
    torch.testing.assert_close(
        model[1].weight_quantizer.amax.flatten(), t.abs().amax(dim=(0, 2, 3)), rtol=0, atol=1e-7
    )
    calibrate_weights(model, "percentile", percentile=50)
    half = model[0].weight_quantizer.amax.flatten()
    assert (half < w.abs().amax(1)).all() and (half > 0).all()
    calibrate_weights(model, "max")
    assert torch.equal(model[0].weight_quantizer.amax.flatten(), w.abs().amax(1))
    calibrate_weights(model, "mse")
    assert (model[0].weight_quantizer.amax.flatten() <= w.abs().amax(1) * 1.001).all()


def test_calibrate_weights_per_tensor_and_errors() -> None:
    model = _weight_quantized(axis=None)
    calibrate_weights(model, "max", perchannel=False)
    assert model[0].weight_quantizer.amax.shape == ()
    assert float(model[0].weight_quantizer.amax) == float(model[0].weight.abs().max())
    with pytest.raises(ValueError, match=r"0\.weight_quantizer has axis=None"):
        calibrate_weights(model, "max", perchannel=True)
    with pytest.raises(ValueError, match="method must be percentile, mse or max"):
        calibrate_weights(model, "entropy")


# ----- max_calibrate(shared_states=...) ------------------------------------------------------------
_NVFP4_STATIC = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)},
}
_FUSED = [r"(.*)\.(?:q_proj|k_proj|v_proj)", r"(.*)\.(?:gate_proj|up_proj)"]


def _nvfp4_llama(shared_states=None):
    from core_models import make_tiny_llama

    model = make_tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    algorithm = {"method": "max"}
    if shared_states is not None:
        algorithm["shared_states"] = shared_states
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": _NVFP4_STATIC},
            *mtq.config._default_disabled_quantizer_cfg,
        ],
        "algorithm": algorithm,
    }
    return mtq.quantize(model, config, lambda m: m(ids))


def test_shared_states_give_each_fused_group_one_weight_global_amax() -> None:
    model = _nvfp4_llama({"weight_global_amax": {"patterns": _FUSED}})
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            largest = max(m.weight.abs().reshape(-1, 16).amax(-1).max() for m in group)
            for m in group:
                assert m.weight_quantizer.global_amax is not None
                torch.testing.assert_close(m.weight_quantizer.global_amax, largest.float())
        assert attn.o_proj.weight_quantizer.global_amax is None  # no pattern selects it
        assert mlp.down_proj.weight_quantizer.global_amax is None
    # each pattern makes its own groups: q/k/v and gate/up do not share
    layer = model.model.layers[0]
    assert not torch.equal(
        layer.self_attn.q_proj.weight_quantizer.global_amax,
        layer.mlp.gate_proj.weight_quantizer.global_amax,
    )


@pytest.mark.parametrize("shared_states", [None, {"weight_global_amax": {"patterns": []}}])
def test_without_patterns_calibration_still_shares_within_layers_reading_one_input(
    shared_states,
) -> None:
    """No pattern makes ``max`` share nothing itself; calibration's last step (make_deployable)
    gives q/k/v and gate/up, which read one input, their group's global amax anyway: the state
    ModelOpt's default patterns give."""
    model = _nvfp4_llama(shared_states)
    patterned = _nvfp4_llama({"weight_global_amax": {"patterns": _FUSED}})
    pairs = [
        (m.weight_quantizer.global_amax, patterned.get_submodule(n).weight_quantizer.global_amax)
        for n, m in model.named_modules()
        if hasattr(m, "weight_quantizer") and isinstance(m, nn.Linear)
    ]
    assert any(got is not None for got, _ in pairs)
    for got, expected in pairs:
        assert (got is None and expected is None) or torch.equal(got, expected)


@pytest.mark.parametrize(
    ("shared_states", "message"),
    [
        ({"input_amax": {"patterns": []}}, "shared_states must be"),
        ({"weight_global_amax": {"regex": ["x"]}}, "takes only 'patterns'"),
        ({"weight_global_amax": {"patterns": ["(unclosed"]}}, "pattern '\\(unclosed'"),
    ],
)
def test_bad_shared_states_are_named(shared_states, message) -> None:
    from quant_core.model_calib import max_calibrate

    model = nn.Sequential(nn.Linear(16, 16))
    mtq.quantize(model, {**mtq.INT8_DEFAULT_CFG.copy(), "algorithm": None})
    with pytest.raises(ValueError, match=message):
        max_calibrate(model, lambda m: m(torch.randn(2, 16)), shared_states=shared_states)

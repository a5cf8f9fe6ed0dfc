"""quantize/calibrate behaviour: clear errors, usable model after a failure, registry, plugins, progress."""

from __future__ import annotations

import pytest
import torch
from core_models import SmallCNN
from torch import nn

import quant_core as mtq
from quant_core import plugins
from quant_core.algorithms import get_algorithm, register_algorithm
from quant_core.conversion import iter_tensor_quantizers
from quant_core.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear, QuantModuleRegistry


def test_no_quantizable_module_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no quantizable module in Sequential.*mtq\.register"):
        mtq.quantize(nn.Sequential(nn.ReLU(), nn.Tanh()), mtq.INT8_DEFAULT_CFG, None)


def test_forward_loop_that_never_calls_the_model_is_an_error(cnn, images):
    with pytest.raises(mtq.CalibrationError, match="returned without running the model"):
        mtq.quantize(cnn, mtq.INT8_DEFAULT_CFG, lambda model: None)


def test_forward_loop_that_raises_leaves_the_model_usable(cnn, images):
    def forward_loop(model):
        model(images[0])
        raise KeyError("bad batch")

    with pytest.raises(
        mtq.CalibrationError, match=r"forward_loop raised KeyError.*bad batch"
    ) as info:
        mtq.quantize(cnn, mtq.INT8_DEFAULT_CFG, forward_loop)
    assert isinstance(info.value.__cause__, KeyError)
    quantizers = [q for _n, q in iter_tensor_quantizers(cnn)]
    assert all(q._if_quant and not q._if_calib for q in quantizers)
    assert cnn.conv1.input_quantizer.amax is None  # nothing half-collected was kept
    assert cnn.conv1.weight_quantizer.amax is not None  # weights are calibrated from the weights
    with pytest.warns(RuntimeWarning, match="never calibrated"):
        out = cnn(images[1])
    assert torch.isfinite(out).all()
    mtq.calibrate(cnn, "max", lambda m: [m(x) for x in images])  # and it can be calibrated again
    assert cnn.conv1.input_quantizer.amax is not None


def test_unknown_algorithm_and_bad_options_are_named(cnn, images):
    with pytest.raises(
        ValueError, match=r"unknown calibration algorithm 'maxx'.*Registered algorithms: .*max"
    ):
        mtq.quantize(cnn, {"quant_cfg": {"*": {"num_bits": 8}}, "algorithm": "maxx"}, None)
    with pytest.raises(ValueError, match=r"'max' does not take option\(s\) \['alpah'\]"):
        mtq.calibrate(cnn, {"method": "max", "alpah": 0.5}, lambda m: m(images[0]))


def test_registry_message_for_missing_algorithm_module(monkeypatch):
    from quant_core.algorithms import registry

    monkeypatch.delitem(registry._ALGORITHMS, "smoothquant")
    with pytest.raises(
        ValueError, match=r"'smoothquant'.*quant_core\.algorithms\.smoothquant.*not present"
    ):
        get_algorithm("smoothquant")


@pytest.mark.filterwarnings("ignore:.*never calibrated:RuntimeWarning")
def test_custom_algorithm_registration(cnn, images):
    calls = []

    @register_algorithm("count_batches_for_test")
    def count(model, forward_loop, scale=1.0):
        forward_loop(model)
        calls.append(scale)

    mtq.quantize(
        cnn,
        {
            "quant_cfg": {"*": {"num_bits": 8}},
            "algorithm": {"method": "count_batches_for_test", "scale": 2.0},
        },
        lambda m: m(images[0]),
    )
    assert calls == [2.0]


def test_conversion_is_in_place_keeping_parameters_and_hooks(cnn, images):
    weight = cnn.conv1.weight
    seen = []
    cnn.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = mtq.quantize(cnn, mtq.INT8_DEFAULT_CFG, lambda m: m(images[0]))
    assert model is cnn
    assert (
        type(cnn.conv1) is QuantConv2d
        and type(cnn.up) is QuantConvTranspose2d
        and type(cnn.head) is QuantLinear
    )
    assert cnn.conv1.weight is weight and cnn.conv1.weight.data_ptr() == weight.data_ptr()
    seen.clear()
    cnn(images[0])
    assert seen == [torch.Size([4, 8, 16, 16])]
    assert not cnn.conv1.output_quantizer.is_enabled


def test_quantized_conv_transpose_matches_functional_reference(images):
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
    x = images[0]
    ref = up(x)
    mtq.quantize(
        nn.Sequential(up), {"quant_cfg": {"*": {"enable": False}}, "algorithm": None}, None
    )
    assert torch.equal(up(x), ref)  # quantizers off: identical to the float module
    assert torch.equal(
        up(x, output_size=[31, 31]), nn.ConvTranspose2d.forward(up, x, output_size=[31, 31])
    )


def test_registry_keys_and_unregister():
    assert QuantModuleRegistry.get(nn.Linear) is QuantLinear
    assert QuantModuleRegistry.get_key(nn.Conv2d) == "nn.Conv2d"
    assert nn.LayerNorm not in QuantModuleRegistry
    with pytest.raises(KeyError, match="LayerNorm is not registered"):
        mtq.unregister(nn.LayerNorm)
    with pytest.raises(TypeError, match="_setup"):
        mtq.register(original_cls=nn.LayerNorm, quantized_cls=nn.LayerNorm)


def test_calibration_shows_a_progress_bar(cnn, images, capsys):
    mtq.quantize(cnn, mtq.INT8_DEFAULT_CFG, lambda m: [m(x) for x in images])
    assert "calibrating (max)" in capsys.readouterr().err


def test_plugins_run_once_and_missing_layer_features_name_the_package(monkeypatch):
    calls = []

    class FakeEntryPoint:
        name, value = "fake", "fake_module:hook"

        def load(self):
            return lambda: calls.append(1)

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_features", {})
    monkeypatch.setattr(
        plugins, "entry_points", lambda group: [FakeEntryPoint()] if group == plugins.GROUP else []
    )
    plugins.load_plugins()
    plugins.load_plugins()
    QuantModuleRegistry.get(nn.Linear)
    assert calls == [1]

    def not_installed(name):
        raise plugins.PackageNotFoundError(name)

    monkeypatch.setattr(plugins, "version", not_installed)
    with pytest.raises(ImportError, match="pip install quant-llm"):
        mtq.auto_quantize(nn.Linear(2, 2))
    monkeypatch.setattr(plugins, "version", lambda name: "9.9")
    with pytest.raises(ImportError, match=r"not provided by the installed quant-llm 9\.9"):
        mtq.auto_quantize(nn.Linear(2, 2))


def test_broken_plugin_warns_with_its_name_and_core_still_works(monkeypatch):
    class BrokenEntryPoint:
        name, value = "broken", "missing_module:hook"

        def load(self):
            raise ModuleNotFoundError("No module named 'missing_module'")

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", {})
    monkeypatch.setattr(plugins, "entry_points", lambda group: [BrokenEntryPoint()])
    with pytest.warns(RuntimeWarning, match="plugin 'broken'.*missing_module"):
        model = mtq.quantize(SmallCNN(), mtq.INT8_WEIGHT_ONLY_CFG, None)
    assert isinstance(model.conv1, QuantConv2d)


class SelfQuantizedNorm(nn.LayerNorm):
    """A module that builds its own quantizer (no registry conversion involved)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.input_quantizer = mtq.TensorQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


def test_modules_with_their_own_quantizers_are_calibrated():
    model = nn.Sequential(SelfQuantizedNorm(8))
    x = torch.randn(4, 8) * 3
    mtq.quantize(
        model,
        {"quant_cfg": {"*input_quantizer": {"num_bits": 8}}, "algorithm": "max"},
        lambda m: m(x),
    )
    assert torch.equal(model[0].input_quantizer.amax, x.abs().max())


def test_fake_quant_false_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"fake_quant=False.*quant-export"):
        mtq.QuantizerAttributeConfig(fake_quant=False)


def test_quantize_parses_its_config_and_algorithm_once(cnn, images, monkeypatch):
    from quant_core import preflight
    from quant_core.config import schema

    calls = {"normalize": 0, "algorithms": 0, "layerwise": 0}
    normalize, specs = schema.normalize_quant_cfg, preflight.algorithm_specs
    split = preflight.split_layerwise

    def counted_normalize(quant_cfg):
        calls["normalize"] += 1
        return normalize(quant_cfg)

    def counted_specs(algorithm):
        calls["algorithms"] += 1
        return specs(algorithm)

    def counted_split(method, options):
        calls["layerwise"] += 1
        return split(method, options)

    monkeypatch.setattr(schema, "normalize_quant_cfg", counted_normalize)
    monkeypatch.setattr(preflight, "algorithm_specs", counted_specs)
    monkeypatch.setattr(preflight, "split_layerwise", counted_split)
    mtq.quantize(cnn, mtq.INT8_DEFAULT_CFG, lambda m: [m(x) for x in images])
    assert calls == {"normalize": 1, "algorithms": 1, "layerwise": 1}
    assert cnn.conv1.input_quantizer.amax is not None  # calibrated by the one parsed "max"

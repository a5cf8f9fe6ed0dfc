"""Typed config pieces of ModelOpt 0.47: ``LayerwiseConfig``, ``QuantizerCfgEntry``, empty ``cfg``
rules and ``LSQConfig.scale_algorithm``, written from ModelOpt's documented field rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.config import (
    GPTQCalibConfig,
    LayerwiseConfig,
    LSQConfig,
    MaxCalibConfig,
    MseCalibConfig,
    QuantizerAttributeConfig,
    QuantizerCfgEntry,
)
from quant_core.conversion import iter_quantizers


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# ----- LayerwiseConfig -------------------------------------------------------------------------
def test_layerwise_is_parsed_into_a_typed_config_and_read_back() -> None:
    config = MaxCalibConfig(layerwise={"enable": True})
    assert isinstance(config.layerwise, LayerwiseConfig) and config["layerwise"] is config.layerwise
    assert config.layerwise.enable and not config.layerwise.get_qdq_activations_from_prev_layer
    assert config.layerwise["save_every"] == 1 and config.layerwise.checkpoint_dir is None
    assert config.to_spec() == {"method": "max", "layerwise": {"enable": True}}
    # a LayerwiseConfig object, True and None are accepted as well
    assert MaxCalibConfig(layerwise=LayerwiseConfig(enable=True)).to_spec() == config.to_spec()
    assert MaxCalibConfig(layerwise=True).layerwise.enable
    assert MaxCalibConfig(layerwise=None).layerwise == LayerwiseConfig()
    assert MaxCalibConfig().layerwise == LayerwiseConfig()  # the default, not passed on
    assert MaxCalibConfig().to_spec() == {"method": "max"}


def test_gptq_reads_quantized_activations_of_earlier_layers_by_default() -> None:
    assert GPTQCalibConfig().layerwise.get_qdq_activations_from_prev_layer
    set_false = GPTQCalibConfig(
        layerwise={"enable": True, "get_qdq_activations_from_prev_layer": False}
    )
    assert not set_false.layerwise.get_qdq_activations_from_prev_layer
    assert not MaxCalibConfig(
        layerwise={"enable": True}
    ).layerwise.get_qdq_activations_from_prev_layer


@pytest.mark.parametrize(
    ("layerwise", "message"),
    [
        ({"enable": True, "save_every": 0}, "save_every"),
        ({"enable": True, "checkpoint": "search_state.pt"}, "checkpoint"),
        ({"checkpoint_dir": "layer_checkpoints"}, "checkpoint_dir requires layerwise.enable"),
        ({"enable": "maybe"}, "enable"),
    ],
)
def test_layerwise_validators(layerwise: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaxCalibConfig(layerwise=layerwise)


def test_calib_mutates_weights_false_only_for_amax_only_algorithms() -> None:
    assert not MaxCalibConfig(
        layerwise={"calib_mutates_weights": False}
    ).layerwise.calib_mutates_weights
    MseCalibConfig(layerwise={"calib_mutates_weights": False})
    with pytest.raises(ValueError, match="'gptq' mutates layer weights"):
        GPTQCalibConfig(layerwise={"calib_mutates_weights": False})


def test_resumable_layerwise_fields_are_refused_by_name_before_the_model_changes() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    algorithm = GPTQCalibConfig(
        layerwise=LayerwiseConfig(enable=True, checkpoint_dir="layer_checkpoints")
    )
    with pytest.raises(ValueError, match="checkpoint_dir"):
        mtq.quantize(model, {**mtq.INT8_WEIGHT_ONLY_CFG.copy(), "algorithm": algorithm}, None)
    assert not list(iter_quantizers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layerwise_config_object_inside_an_algorithm_dict_is_accepted() -> None:
    model = mlp()
    data = torch.randn(4, 16)
    algorithm = {"method": "max", "layerwise": LayerwiseConfig(enable=False)}
    mtq.quantize(model, {**mtq.INT8_DEFAULT_CFG.copy(), "algorithm": algorithm}, lambda m: m(data))
    assert model[0].input_quantizer.amax is not None


# ----- typed entries -----------------------------------------------------------------------------
def test_normalize_returns_typed_entries_that_read_like_dicts() -> None:
    entries = mtq.normalize_quant_cfg_list(
        [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": [{"num_bits": 8}, {"num_bits": (4, 3)}]},
        ]
    )
    assert all(isinstance(e, QuantizerCfgEntry) for e in entries)
    weight = entries[1]
    assert isinstance(weight["cfg"], QuantizerAttributeConfig) and weight["cfg"].num_bits == 4
    assert weight.get("enable") is True and weight["parent_class"] is None and "cfg" in weight
    dumped = weight.model_dump()
    assert dumped["cfg"]["num_bits"] == 4 and dumped["cfg"]["axis"] == 0 and dumped["enable"]
    assert [c.num_bits for c in entries[2].cfg] == [8, (4, 3)]
    assert mtq.find_quant_cfg_entry_by_path(entries, "*weight_quantizer") is weight


def test_typed_entries_quantize_like_the_dicts_they_came_from() -> None:
    raw = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
    ]
    typed = mtq.normalize_quant_cfg_list(raw)
    a, b = mlp(), mlp()
    mtq.quantize(a, {"quant_cfg": raw, "algorithm": "max"}, None)
    mtq.quantize(b, {"quant_cfg": typed, "algorithm": "max"}, None)
    assert repr(a) == repr(b) and torch.equal(
        a[0].weight_quantizer.amax, b[0].weight_quantizer.amax
    )


def test_entry_without_cfg_or_enable_is_refused() -> None:
    with pytest.raises(ValueError, match="neither 'cfg' nor 'enable'"):
        QuantizerCfgEntry(quantizer_name="*weight_quantizer")


# ----- empty cfg -------------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", [{}, [], [{}], [{}, {}]])
def test_empty_cfg_that_disables_normalizes_to_none(empty) -> None:
    (entry,) = mtq.normalize_quant_cfg_list(
        [{"quantizer_name": "*weight_quantizer", "cfg": empty, "enable": False}]
    )
    assert entry.cfg is None and entry.enable is False


@pytest.mark.parametrize("empty", [{}, [], [{}]])
@pytest.mark.parametrize("enable", [True, None])
def test_empty_cfg_that_enables_is_refused_by_quantize_and_normalize(empty, enable) -> None:
    entry = {"quantizer_name": "*weight_quantizer", "cfg": empty}
    if enable is not None:
        entry["enable"] = enable
    with pytest.raises(ValueError, match=r"'\*weight_quantizer'.*empty 'cfg'"):
        mtq.normalize_quant_cfg_list([entry])
    model = mlp()
    with pytest.raises(ValueError, match="empty 'cfg'"):
        mtq.quantize(model, {"quant_cfg": [{"quantizer_name": "*", "enable": False}, entry]}, None)
    assert not list(iter_quantizers(model))  # refused before any module was converted


def test_disabling_with_an_empty_cfg_keeps_the_attributes_for_a_later_re_enable() -> None:
    model = mlp()
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
            {"quantizer_name": "*weight_quantizer", "cfg": {}, "enable": False},
        ],
        "algorithm": None,
    }
    mtq.quantize(model, config)
    assert not model[0].weight_quantizer.is_enabled
    mtq.set_quantizer_by_cfg(model, [{"quantizer_name": "*weight_quantizer", "enable": True}])
    assert model[0].weight_quantizer.is_enabled and model[0].weight_quantizer.num_bits == 4


# ----- LSQConfig.scale_algorithm -----------------------------------------------------------------
def test_lsq_scale_algorithm_is_parsed_into_its_config_class() -> None:
    lsq = LSQConfig(scale_algorithm={"method": "max"})
    assert isinstance(lsq.scale_algorithm, MaxCalibConfig)
    assert lsq.to_spec() == {"method": "lsq", "scale_algorithm": {"method": "max"}}
    mse = LSQConfig(scale_algorithm={"method": "mse", "num_steps": 5})
    assert isinstance(mse.scale_algorithm, MseCalibConfig) and mse.scale_algorithm.num_steps == 5
    assert mse.to_spec()["scale_algorithm"] == {"method": "mse", "num_steps": 5}
    assert LSQConfig(scale_algorithm=MaxCalibConfig()).to_spec() == lsq.to_spec()
    assert LSQConfig().scale_algorithm is None


@pytest.mark.parametrize(
    "bad", [{"method": "awq_lite"}, {"num_steps": 3}, {"method": "mse", "num_steps": 0}]
)
def test_lsq_scale_algorithm_errors_name_the_bad_input(bad) -> None:
    with pytest.raises(ValueError, match="scale_algorithm"):
        LSQConfig(scale_algorithm=bad)


def test_lsq_with_a_typed_scale_algorithm_learns_block_amaxes() -> None:
    static = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(8, 64)
    mtq.quantize(
        model,
        {
            "quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": static}],
            "algorithm": LSQConfig(scale_algorithm=MaxCalibConfig()),
        },
        lambda m: m(x),
    )
    assert model[0].weight_quantizer.amax_post.shape == (32, 4)

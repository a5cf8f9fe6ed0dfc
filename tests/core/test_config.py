"""Config schema: validation errors name the bad key and value, both quant_cfg shapes, built-in constants."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.config import QuantizerAttributeConfig, normalize_quant_cfg, validate_config
from quant_core.config.frozen import QuantCfgList
from quant_core.conversion import iter_quantizers


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))


def state(model: nn.Module) -> dict[str, tuple]:
    return {
        n: (q.is_enabled, q.attribute_config.model_dump_json())
        for n, q, _p in iter_quantizers(model)
    }


def test_choices_names_every_builtin_config_and_each_validates():
    from quant_core.config import builtin

    defined = {n for n, v in vars(builtin).items() if n.endswith("_CFG") and isinstance(v, dict)}
    assert mtq.choices == defined and len(defined) == 36  # every public preset is a choice
    for name in mtq.choices:
        cfg = getattr(mtq, name)
        # ModelOpt 0.47's KV configs (all but NVFP4_KV_ROTATE_CFG) carry no algorithm
        kv_only = name.endswith("KV_CFG")
        assert set(cfg) == ({"quant_cfg"} if kv_only else {"quant_cfg", "algorithm"})
        validate_config(cfg)


@pytest.mark.parametrize(
    ("name", "weight", "algorithm"),
    [
        ("INT8_DEFAULT_CFG", {"num_bits": 8, "axis": 0}, "max"),
        ("INT8_SMOOTHQUANT_CFG", {"num_bits": 8, "axis": 0}, "smoothquant"),
        # Deliberately not ModelOpt's "max": FP8 weights are GPTQ-rounded (see builtin.py).
        ("FP8_DEFAULT_CFG", {"num_bits": (4, 3), "axis": None}, "gptq"),
        # Deliberately not ModelOpt's awq_lite: AWQ scales then GPTQ rounding (see builtin.py).
        (
            "INT4_AWQ_CFG",
            {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},
            {"method": "awq_gptq", "alpha_step": 0.1, "layerwise": "auto"},
        ),
        (
            "NVFP4_DEFAULT_CFG",
            {
                "num_bits": (2, 1),
                "effective_bits": 4.5,
                "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
            },
            "max",
        ),
        (
            "MXFP4_DEFAULT_CFG",
            {
                "num_bits": (2, 1),
                "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)},
            },
            None,
        ),
    ],
)
def test_builtin_configs_carry_modelopt_attributes(name, weight, algorithm):
    cfg = getattr(mtq, name)
    assert cfg["quant_cfg"]["*weight_quantizer"] == weight
    assert cfg["algorithm"] == algorithm
    for pattern in (
        "*lm_head*",
        "*router*",
        "*mlp.gate.*",
        "*vision_tower*",
        "output.*",
        "default",
    ):
        assert cfg["quant_cfg"][pattern] == {"enable": False}
    assert cfg["quant_cfg"]["nn.BatchNorm2d"] == {"*": {"enable": False}}
    assert cfg["quant_cfg"]["nn.Embedding"] == {"*": {"enable": False}}


def test_w4a8_weight_is_a_sequential_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    model = mtq.quantize(model, mtq.W4A8_AWQ_BETA_CFG, lambda m: m(torch.randn(4, 128)))
    wq = model[0].weight_quantizer
    assert isinstance(wq, mtq.SequentialQuantizer) and len(wq) == 2
    assert wq[0].num_bits == 4 and wq[0].block_sizes[-1] == 128 and wq[1].num_bits == (4, 3)


def test_builtin_constants_are_read_only_and_copies_are_deep_and_plain():
    with pytest.raises(TypeError, match="read-only"):
        mtq.INT8_DEFAULT_CFG["quant_cfg"]["*x"] = {"enable": False}
    with pytest.raises(TypeError, match="read-only"):
        mtq.W4A8_AWQ_BETA_CFG["quant_cfg"]["*weight_quantizer"].append({})
    for clone in (
        mtq.FP8_DEFAULT_CFG.copy(),
        copy.copy(mtq.FP8_DEFAULT_CFG),
        copy.deepcopy(mtq.FP8_DEFAULT_CFG),
    ):
        # quant_cfg is ModelOpt 0.47's entry list, editable by pattern as the dict shape was.
        assert type(clone) is dict and type(clone["quant_cfg"]) is QuantCfgList
        assert all(type(e) is dict for e in clone["quant_cfg"])
        clone["quant_cfg"]["*weight_quantizer"]["num_bits"] = 8
    assert mtq.FP8_DEFAULT_CFG["quant_cfg"]["*weight_quantizer"]["num_bits"] == (4, 3)
    json.dumps(mtq.FP8_DEFAULT_CFG)  # still an ordinary JSON-able dict


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"numbits": 4}, r"unknown key 'numbits' \(value 4\)"),
        ({"num_bits": 17}, r"num_bits.*17"),
        ({"num_bits": (3, 3)}, r"\(3, 3\).*not a supported floating-point format"),
        (
            {"num_bits": 4, "axis": 0, "block_sizes": {-1: 128}},
            r"axis=0 cannot be combined with block_sizes",
        ),
        (
            {"block_sizes": {-1: 0}},
            r"block_sizes\[-1\]: the block size for axis -1 must be a positive int",
        ),
        ({"block_sizes": {-1: 16, "scale_bits": (5, 5)}}, r"scale_bits"),
        ({"block_sizes": {-1: 16, "kind": "x"}}, r"unknown block_sizes key 'kind'"),
        ({"type": "sometimes"}, r"type='sometimes'"),
        ({"calibrator": "median"}, r"calibrator='median'"),
    ],
)
def test_bad_attributes_are_rejected_naming_key_and_value(attrs, message):
    with pytest.raises(ValueError, match=message):
        validate_config({"quant_cfg": {"*weight_quantizer": attrs}, "algorithm": "max"})


def test_bad_config_shapes_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown config key 'quant_config'"):
        validate_config({"quant_config": {}, "algorithm": "max"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['enabled'\]"):
        validate_config({"quant_cfg": [{"quantizer_name": "*", "enabled": False}]})
    with pytest.raises(ValueError, match="sets neither 'cfg' nor 'enable'"):
        validate_config({"quant_cfg": [{"quantizer_name": "*"}]})
    with pytest.raises(ValueError, match="'enable' for pattern '\\*' must be True or False"):
        validate_config({"quant_cfg": {"*": {"enable": "no"}}})
    with pytest.raises(ValueError, match="algorithm"):
        validate_config({"quant_cfg": {}, "algorithm": {"alpha": 0.5}})


def test_list_shape_means_the_same_as_dict_shape():
    as_dict = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 8}},
            "*input_quantizer": {"num_bits": (4, 3)},
            "nn.Linear": {"*input_quantizer": {"enable": False}},
            "0.*": {"enable": True},
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
    as_list = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {-1: 8}}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3)}},
            {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "enable": False},
            {"quantizer_name": "0.*", "enable": True},
        ],
        "algorithm": "max",
    }
    data = torch.randn(4, 8)
    a = mtq.quantize(mlp(), as_dict, lambda m: m(data))
    b = mtq.quantize(mlp(), as_list, lambda m: m(data))
    assert state(a) == state(b)
    assert (
        a[0].input_quantizer.is_enabled and not a[2].input_quantizer.is_enabled
    )  # later entry wins
    assert torch.equal(a(data), b(data))


def test_default_entry_applies_first_wherever_it_is_written():
    entries = normalize_quant_cfg(
        {"*weight_quantizer": {"num_bits": 8}, "default": {"enable": False}}
    )
    assert entries[0].quantizer_name == "*" and entries[0].enable is False


def test_callable_pattern_and_enable_only_entry_keep_attributes():
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 8}},
            "*input_quantizer": {"enable": False},
            (lambda name: name.startswith("2.")): {"enable": False},
        },
        "algorithm": "max",
    }
    model = mtq.quantize(mlp(), cfg, None)
    assert not model[2].weight_quantizer.is_enabled
    assert model[2].weight_quantizer.num_bits == 4  # enable-only entry left the attributes alone
    assert model[0].weight_quantizer.is_enabled


def test_helpers_set_enable_and_disable_by_wildcard():
    model = mtq.quantize(mlp(), mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    mtq.disable_quantizer(model, "*input_quantizer")
    assert not any(
        q.is_enabled for n, q, _p in iter_quantizers(model) if n.endswith("input_quantizer")
    )
    mtq.enable_quantizer(model, lambda name: name == "2.input_quantizer")
    assert model[2].input_quantizer.is_enabled and not model[0].input_quantizer.is_enabled
    mtq.set_quantizer_attribute(model, "*weight_quantizer", {"num_bits": 4})
    assert model[0].weight_quantizer.num_bits == 4 and model[0].weight_quantizer.axis == 0
    assert model[0].weight_quantizer.amax is None  # a new format drops the old calibration
    mtq.set_quantizer_by_cfg(model, {"*weight_quantizer": {"num_bits": (4, 3)}})
    assert model[2].weight_quantizer.num_bits == (4, 3) and model[2].weight_quantizer.axis is None


def test_exact_names_and_wildcards_apply_in_config_order():
    """Entries naming one quantizer exactly are looked up by name; the later entry still wins."""
    cfg = {"*weight_quantizer": {"num_bits": 8, "axis": 0}, "*input_quantizer": {"enable": False}}
    model = mtq.quantize(mlp(), {"quant_cfg": cfg, "algorithm": None})
    mtq.set_quantizer_by_cfg(
        model,
        [
            {"quantizer_name": "0.weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "2.weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
            {"quantizer_name": "2.weight_quantizer", "enable": False},
        ],
    )
    first, last = model[0].weight_quantizer, model[2].weight_quantizer
    assert (first.num_bits, first.is_enabled) == (8, True)  # the later wildcard wins
    assert (last.num_bits, last.is_enabled) == (4, False)  # later exact names win, in order
    assert not model[0].input_quantizer.is_enabled  # named by no entry: unchanged


def test_attribute_config_round_trips_through_json():
    attrs = QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
    )
    again = QuantizerAttributeConfig(**json.loads(json.dumps(attrs.to_json_dict())))
    assert again == attrs


def test_postprocess_amax_applies_to_matching_quantizers():
    model = mtq.quantize(mlp(), mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    before = model[0].input_quantizer.amax.clone()
    mtq.postprocess_amax(model, "*0.input_quantizer", lambda a: a * 0.5)
    assert torch.equal(model[0].input_quantizer.amax, before * 0.5)


# block_sizes is validated in one place (quant_kernels.blocking.check_block_sizes): the config, the
# parsed format and the kernels' keyword API agree (before, the config refused any
# scale_block_sizes that the other two took when empty).
def _three_readers(block_sizes: dict) -> list:
    import quant_kernels as qk
    from quant_kernels.formats import QuantFormat

    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    return [
        lambda: QuantizerAttributeConfig(num_bits=4, block_sizes=block_sizes).block_sizes,
        lambda: QuantFormat.parse(4, block_sizes=block_sizes).blocks,
        lambda: qk.fake_quantize(x, num_bits=4, block_sizes=block_sizes).shape,
    ]


@pytest.mark.parametrize("empty", [None, {}])
def test_an_empty_scale_block_sizes_is_taken_alike_by_config_format_and_kernels(empty):
    config, blocks, shape = (
        read() for read in _three_readers({-1: 16, "scale_block_sizes": empty})
    )
    assert config == {-1: 16} and blocks == ((-1, 16),) and shape == (2, 32)


@pytest.mark.parametrize(
    ("block_sizes", "message"),
    [
        ({-1: 16, "scale_block_sizes": {-1: 128}}, r"\(double quantization\) is not supported"),
        ({-1: 16, "kind": "x"}, r"unknown block_sizes key 'kind'"),
        ({-1: 0}, r"block_sizes\[-1\]: the block size for axis -1 must be a positive int"),
        ({"scale_bits": (4, 3)}, r"names no axis"),
        ({-1: 16, "type": "sometimes"}, r"block_sizes\['type'\] must be 'static' or 'dynamic'"),
    ],
)
def test_a_bad_block_sizes_is_refused_alike_by_config_format_and_kernels(block_sizes, message):
    for read in _three_readers(block_sizes):
        with pytest.raises(ValueError, match=message):
            read()

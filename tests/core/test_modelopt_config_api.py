"""ModelOpt 0.47's config functions and algorithm config classes.

Expected values are ModelOpt 0.47.0's, read from ``modelopt/torch/quantization/config.py`` and
measured with it on the same inputs (``need_calibration`` on its built-in configs; the entries
``normalize_quant_cfg_list`` returns for a legacy dict).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

import quant_core as mtq

LEGACY = {
    "*weight_quantizer": {"num_bits": 4, "axis": 0},
    "default": {"enable": False},
    "nn.Linear": {"*input_quantizer": {"enable": False}},
}


def test_normalize_quant_cfg_list_matches_modelopt_entries() -> None:
    # ModelOpt 0.47.0 gives these three entries ("default" first, as "*"), enable defaulting to
    # True, as typed entries whose model_dump() has the full attribute config.
    weight_cfg = mtq.QuantizerAttributeConfig(num_bits=4, axis=0).model_dump()
    assert [e.model_dump() for e in mtq.normalize_quant_cfg_list(LEGACY)] == [
        {"quantizer_name": "*", "parent_class": None, "cfg": None, "enable": False},
        {
            "quantizer_name": "*weight_quantizer",
            "parent_class": None,
            "cfg": weight_cfg,
            "enable": True,
        },
        {
            "quantizer_name": "*input_quantizer",
            "parent_class": "nn.Linear",
            "cfg": None,
            "enable": False,
        },
    ]
    with pytest.raises(ValueError, match="unknown key 'bits'"):
        mtq.normalize_quant_cfg_list([{"quantizer_name": "*", "cfg": {"bits": 4}}])


def test_find_quant_cfg_entry_by_path_is_exact_and_takes_the_last() -> None:
    entries = [
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8}},
        {"quantizer_name": "*weight_quantizer", "enable": False},
        {"quantizer_name": "*input_quantizer", "enable": False},
    ]
    assert mtq.find_quant_cfg_entry_by_path(entries, "*input_quantizer") is entries[2]
    with pytest.raises(KeyError):
        mtq.find_quant_cfg_entry_by_path(entries, "*quantizer")  # no wildcard matching


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # ModelOpt 0.47.0's answers for its configs of the same name
        ("INT8_DEFAULT_CFG", True),
        ("INT8_WEIGHT_ONLY_CFG", False),
        # quant's preset searches its block scales on the data (ModelOpt's: "max"; see below)
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", True),
        ("NVFP4_DEFAULT_CFG", True),
        ("W4A16_NVFP4_CFG", False),
        ("MXFP8_DEFAULT_CFG", True),
        ("FP8_KV_CFG", True),
        ("INT4_AWQ_CFG", True),
    ],
)
def test_need_calibration_agrees_with_modelopt(name: str, expected: bool) -> None:
    assert mtq.need_calibration(getattr(mtq, name)) is expected


def test_need_calibration_of_modelopts_int4_weight_only_config_is_false() -> None:
    modelopt = {**mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG.copy(), "algorithm": "max"}
    assert mtq.need_calibration(modelopt) is False


def test_update_quant_cfg_with_kv_cache_quant_appends_kv_entries_only() -> None:
    base = mtq.INT8_WEIGHT_ONLY_CFG.copy()
    out = mtq.update_quant_cfg_with_kv_cache_quant(base, mtq.FP8_KV_CFG["quant_cfg"])
    assert base == mtq.INT8_WEIGHT_ONLY_CFG.copy()  # input untouched (a deep copy is returned)
    assert out["quant_cfg"] == [*base["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]
    assert out["algorithm"] == "max"
    only_kv = mtq.update_quant_cfg_with_kv_cache_quant({"quant_cfg": None, "algorithm": None}, [])
    assert only_kv == {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}


def test_load_config_reads_yaml_safely(tmp_path) -> None:
    (tmp_path / "w4.yaml").write_text(
        "quant_cfg:\n"
        "  - quantizer_name: '*weight_quantizer'\n"
        "    cfg: {num_bits: E4M3, axis: 0}\n"
        "algorithm: max\n"
    )
    cfg = mtq.load_config(tmp_path / "w4", schema_type=mtq.QuantizeConfig)
    assert cfg["quant_cfg"][0]["cfg"]["num_bits"] == (4, 3)
    model = nn.Sequential(nn.Linear(4, 4))
    mtq.quantize(model, cfg)
    assert model[0].weight_quantizer.num_bits == (4, 3)
    (tmp_path / "evil.yml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(yaml.YAMLError):
        mtq.load_config(str(tmp_path / "evil.yml"))
    with pytest.raises(FileNotFoundError):
        mtq.load_config(tmp_path / "absent")


def test_algorithm_config_classes_stand_for_their_dicts() -> None:
    assert mtq.SmoothQuantCalibConfig(alpha=0.5).to_spec() == {
        "method": "smoothquant",
        "alpha": 0.5,
    }
    assert mtq.GPTQCalibConfig(perc_damp=0.02).to_spec() == {"method": "gptq", "percdamp": 0.02}
    assert mtq.MaxCalibConfig().to_spec() == {"method": "max"}
    with pytest.raises(ValueError, match="alpha"):
        mtq.MaxCalibConfig(alpha=0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    data = torch.randn(4, 8)
    mtq.quantize(
        model, {**mtq.INT8_DEFAULT_CFG.copy(), "algorithm": mtq.MaxCalibConfig()}, lambda m: m(data)
    )
    assert float(model[0].input_quantizer.amax) == pytest.approx(float(data.abs().max()))
    with pytest.raises(ValueError, match="does not take option"):
        mtq.calibrate(model, {"method": "awq_lite", "foo": 1}, lambda m: m(data))


@pytest.mark.parametrize("method", ["awq_lite", "awq_clip", "awq_full"])
def test_awq_debug_leaves_the_search_record_on_each_layer(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(16, 64)
    int4 = {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": int4},
        ],
        "algorithm": {"method": method, "debug": True},
    }
    mtq.quantize(model, config, lambda m: m(x))
    layer = model[0]
    if method != "awq_clip":
        record = layer.awq_lite
        torch.testing.assert_close(record.act_scale, x.abs().mean(0))  # mean |x| per channel
        assert record.best_alpha == min(record.loss, key=record.loss.get)
        assert -1.0 in record.loss and len(record.loss) == 12  # no scaling, then α = 0, 0.1, ..., 1
        assert record.best_scale.shape == (64,)
    if method != "awq_lite":
        clip = layer.awq_clip
        assert clip.w_amax.shape == clip.best_amax.shape == (32, 4, 1)
        assert (clip.best_amax <= clip.w_amax * (1 + 1e-6)).all()
    plain = nn.Sequential(nn.Linear(64, 32))
    mtq.quantize(plain, {**config, "algorithm": method}, lambda m: m(x))
    assert not hasattr(plain[0], "awq_lite") and not hasattr(plain[0], "awq_clip")


def _lm() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.fc1, model.fc2, model.lm_head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
    return model


def _states(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (q.is_enabled, q.num_bits, q.axis, q.block_sizes)
        for name, q in model.named_modules()
        if isinstance(q, mtq.TensorQuantizer)
    }


def _apply(cfg) -> dict[str, tuple]:
    model = _lm()  # never run: these tests read quantizer states only
    mtq.replace_quant_module(model)
    mtq.set_quantizer_by_cfg(model, cfg)
    return _states(model)


def test_builtin_quant_cfg_is_modelopt_entry_list() -> None:
    entries = list(mtq.INT8_DEFAULT_CFG["quant_cfg"])
    # ModelOpt 0.47.0's INT8_DEFAULT_CFG starts with these three entries.
    assert entries[:3] == [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ]
    assert {"quantizer_name": "*", "parent_class": "nn.BatchNorm2d", "enable": False} in entries


def test_dict_edit_of_an_existing_pattern_keeps_its_place_like_the_dict_shape() -> None:
    cfg = mtq.INT8_DEFAULT_CFG.copy()
    legacy = dict(cfg["quant_cfg"].items())  # the same config in the classic dict shape
    new = {"num_bits": 4, "block_sizes": {-1: 8}}
    cfg["quant_cfg"]["*weight_quantizer"] = new
    legacy["*weight_quantizer"] = new
    states = _apply(cfg["quant_cfg"])
    assert states == _apply(legacy)
    assert states["lm_head.weight_quantizer"][0] is False  # "*lm_head*" (later) still wins
    assert states["fc1.weight_quantizer"] == (True, 4, None, {-1: 8})


def test_append_and_star_entries_apply_after_the_others() -> None:
    cfg = mtq.INT8_DEFAULT_CFG.copy()
    cfg["quant_cfg"].append({"quantizer_name": "*fc2*", "enable": False})
    states = _apply(cfg["quant_cfg"])
    assert not states["fc2.weight_quantizer"][0] and states["fc1.weight_quantizer"][0]
    cfg["quant_cfg"]["*"] = {"enable": False}  # as in the dict shape: a new key, applied last
    assert not any(s[0] for s in _apply(cfg["quant_cfg"]).values())
    assert (
        cfg["quant_cfg"]["default"] == {"enable": False}
        and cfg["quant_cfg"][0]["quantizer_name"] == "*"
    )


def test_nested_dict_edit_writes_through_and_builtins_stay_read_only() -> None:
    cfg = mtq.INT8_DEFAULT_CFG.copy()
    cfg["quant_cfg"]["*input_quantizer"]["enable"] = False
    cfg["quant_cfg"]["*weight_quantizer"]["num_bits"] = 4
    assert cfg["quant_cfg"][2] == {
        "quantizer_name": "*input_quantizer",
        "cfg": {"num_bits": 8, "axis": None},
        "enable": False,
    }
    states = _apply(cfg["quant_cfg"])
    assert not states["fc1.input_quantizer"][0] and states["fc1.weight_quantizer"][:2] == (True, 4)
    with pytest.raises(TypeError, match="read-only"):
        mtq.INT8_DEFAULT_CFG["quant_cfg"].append({"quantizer_name": "*", "enable": True})
    with pytest.raises(TypeError, match="read-only"):
        mtq.INT8_DEFAULT_CFG["quant_cfg"]["*weight_quantizer"]["num_bits"] = 4
    assert mtq.INT8_DEFAULT_CFG["quant_cfg"]["*weight_quantizer"] == {"num_bits": 8, "axis": 0}

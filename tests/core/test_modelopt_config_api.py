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
    # ModelOpt 0.47.0 gives these three entries ("default" first, as "*"), enable defaulting to True.
    assert mtq.normalize_quant_cfg_list(LEGACY) == [
        {"quantizer_name": "*", "parent_class": None, "cfg": None, "enable": False},
        {
            "quantizer_name": "*weight_quantizer",
            "parent_class": None,
            "cfg": {"num_bits": 4, "axis": 0},
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
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", False),
        ("NVFP4_DEFAULT_CFG", True),
        ("W4A16_NVFP4_CFG", False),
        ("MXFP8_DEFAULT_CFG", True),
        ("FP8_KV_CFG", True),
        ("INT4_AWQ_CFG", True),
    ],
)
def test_need_calibration_agrees_with_modelopt(name: str, expected: bool) -> None:
    assert mtq.need_calibration(getattr(mtq, name)) is expected


def test_update_quant_cfg_with_kv_cache_quant_appends_kv_entries_only() -> None:
    base = mtq.INT8_WEIGHT_ONLY_CFG.copy()
    out = mtq.update_quant_cfg_with_kv_cache_quant(base, mtq.FP8_KV_CFG["quant_cfg"])
    assert base == mtq.INT8_WEIGHT_ONLY_CFG.copy()  # input untouched (a deep copy is returned)
    entries = mtq.normalize_quant_cfg_list(out["quant_cfg"])
    assert entries[-1]["quantizer_name"] == "*[kv]_bmm_quantizer"
    # quant's KV configs carry a catch-all disable; appended it would switch the weights off.
    assert [e for e in entries[1:] if e["quantizer_name"] == "*" and not e["parent_class"]] == []
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
        mtq.calibrate(model, mtq.AWQLiteCalibConfig(debug=True), lambda m: m(data))

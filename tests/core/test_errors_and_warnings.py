"""Nothing silently wrong: degenerate calibration data, configs that select nothing, out-of-range
options, failures that must leave the model untouched, training-mode calibration, and errors that
name the bad input (issue #17)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from algo_refs import blockwise_ref
from safetensors.torch import save_file
from torch import nn

import quant_core as mtq
import quant_kernels as qk
from quant_core import QuantWarning
from quant_core.atomic import SUFFIX


def mlp(out: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, out))


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[type], dict[str, torch.Tensor]]) -> None:
    types, state = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture
def no_quant_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantWarning)
        yield


# ----- 1. degenerate calibration data --------------------------------------------------------------


def test_all_zero_calibration_leaves_activation_uncalibrated_instead_of_zeroing_the_layer():
    model = mlp()
    with pytest.warns(QuantWarning, match=r"0\.input_quantizer an amax of 0.*Remedy"):
        mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.zeros(4, 8)))
    assert model[0].input_quantizer.amax is None
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    layer = model[0]
    ref = x.double() @ layer.weight.double().T + layer.bias.double()  # float reference
    with pytest.warns(RuntimeWarning, match="never calibrated"):  # it says so when it runs
        y = layer(x).double()
    assert ((y - ref).norm() / ref.norm()).item() < 0.05  # int8 error, not a zeroed layer


def test_recalibrating_on_zeros_keeps_the_previous_amax():
    model = mlp()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    assert model[0].input_quantizer.amax.item() == x.abs().max().item()
    with pytest.warns(QuantWarning, match="previous amax is kept"):
        mtq.calibrate(model, "max", lambda m: m(torch.zeros(4, 8)))
    assert model[0].input_quantizer.amax.item() == x.abs().max().item()


def test_gptq_on_all_zero_data_rounds_to_nearest_instead_of_zeroing():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(128, 16))
    w = model[0].weight.detach().double().clone()
    config = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG.copy()
    config["algorithm"] = {"method": "gptq"}
    with pytest.warns(QuantWarning, match="gptq: layer 0 saw only zeros"):
        mtq.quantize(model, config, lambda m: m(torch.zeros(8, 128)))
    wq = model[0].weight.detach().double()
    rtn = blockwise_ref(w, w.abs().amax(-1, keepdim=True), 128)  # float64 round-to-nearest
    assert wq.abs().sum() > 0
    assert (wq - w).square().sum() <= (rtn - w).square().sum() * (1 + 1e-9)


# ----- 2. patterns and parent classes that select nothing ------------------------------------------


def test_misspelled_pattern_is_named_in_one_warning():
    config = mtq.INT8_DEFAULT_CFG.copy()
    config["quant_cfg"].append({"quantizer_name": "*weight_quantiser", "enable": False})
    with pytest.warns(QuantWarning, match=r"'\*weight_quantiser' matched no quantizer") as seen:
        mtq.quantize(mlp(), config, lambda m: m(torch.randn(4, 8)))
    assert sum(issubclass(w.category, QuantWarning) for w in seen) == 1


def test_builtin_patterns_matching_nothing_are_not_reported(no_quant_warnings):
    # *lm_head*, *router*, nn.BatchNorm*, ... match nothing in an MLP: no warning, also in a copy
    kv_only = {"quant_cfg": [*mtq.config._base_disable_all, *mtq.FP8_KV_CFG["quant_cfg"]]}
    # (FP8_KV_CFG alone now also quantizes every Linear at the defaults, as in ModelOpt 0.47: on a
    # model without attention that warns that no KV cache is quantized, a warning of its own)
    for config in (mtq.INT8_DEFAULT_CFG, mtq.NVFP4_AWQ_LITE_CFG.copy(), kv_only):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # KV-only enables nothing here
            mtq.quantize(mlp(), config, lambda m: m(torch.randn(4, 8)))


def test_unknown_parent_class_is_refused_before_the_model_changes():
    model = mlp()
    before = snapshot(model)
    config = mtq.INT8_DEFAULT_CFG.copy()
    config["quant_cfg"].append(
        {"quantizer_name": "*", "parent_class": "nn.Linearr", "enable": False}
    )
    with pytest.raises(ValueError, match=r"parent_class 'nn\.Linearr'.*did you mean 'nn\.Linear'"):
        mtq.quantize(model, config, lambda m: m(torch.randn(4, 8)))
    assert_unchanged(model, before)


def test_existing_parent_class_without_match_is_warned():
    config = mtq.INT8_DEFAULT_CFG.copy()
    config["quant_cfg"].append(
        {"quantizer_name": "*", "parent_class": "nn.Conv2d", "enable": False}
    )
    with pytest.warns(QuantWarning, match="parent_class 'nn.Conv2d'"):
        mtq.quantize(mlp(), config, lambda m: m(torch.randn(4, 8)))


# ----- 3. option ranges, 4. validate first, then mutate ---------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"method": "smoothquant", "alpha": 5.0}, r"alpha=5\.0 .*less than or equal to 1"),
        ({"method": "awq_lite", "alpha_step": 0}, r"alpha_step=0 .*greater than 0"),
        ({"method": "gptq", "percdamp": 1.5}, r"percdamp=1\.5 .*less than 1"),
        ({"method": "svdquant", "lowrank": 0}, r"lowrank=0 .*greater than or equal to 1"),
        ({"method": "maxx"}, r"unknown calibration algorithm 'maxx'"),
        ({"method": "max", "alpha": 0.5}, r"'max' does not take option\(s\) \['alpha'\]"),
    ],
)
def test_bad_algorithm_is_refused_before_the_model_changes(algorithm, message):
    model = mlp()
    before = snapshot(model)
    config = {"quant_cfg": mtq.INT8_DEFAULT_CFG["quant_cfg"], "algorithm": algorithm}
    with pytest.raises(ValueError, match=message):
        mtq.quantize(model, config, lambda m: m(torch.randn(4, 8)))
    assert_unchanged(model, before)


def test_algorithm_config_classes_carry_the_ranges():
    with pytest.raises(ValueError, match="alpha"):
        mtq.SmoothQuantCalibConfig(alpha=1.5)
    with pytest.raises(ValueError, match="perc_damp"):
        mtq.GPTQCalibConfig(perc_damp=-0.1)
    model = mlp()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"alpha=-1"):
        mtq.model_calib.smoothquant(model, lambda m: m(torch.randn(4, 8)), alpha=-1)
    assert_unchanged(model, before)


@pytest.mark.parametrize("target", ["wider", "shorter"])
def test_restore_into_another_architecture_fails_before_converting(tmp_path, target):
    model = mlp()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    mtq.save(model, tmp_path / "q.safetensors")
    other = mlp(out=6) if target == "wider" else nn.Sequential(nn.Linear(8, 8))
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"nothing was changed|does not have"):
        mtq.restore(other, tmp_path / "q.safetensors")
    assert_unchanged(other, before)


def test_corrupted_quantizer_state_json_is_named(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"quant_core": '{"format": '})
    with pytest.raises(ValueError, match=r"quantizer state in its metadata is not valid JSON"):
        mtq.restore(mlp(), path)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read .*garbage\.safetensors"):
        mtq.restore(mlp(), tmp_path / "garbage.safetensors")


# ----- 5. calibration of a model left in training mode ----------------------------------------------


def test_calibration_runs_in_eval_mode_and_restores_each_modules_mode():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model.train()
    model[2].eval()  # a user-frozen BatchNorm stays frozen
    x = torch.randn(64, 8)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    # Dropout off: the first layer's input amax is max |x| itself (in training mode it is ~2x)
    assert model[1].input_quantizer.amax.item() == x.abs().max().item()
    assert [m.training for m in model] == [True, True, False, True]


# ----- 6. amax shape, 7. errors that name the input ------------------------------------------------


def test_amax_of_the_wrong_axis_is_refused_by_name():
    model = mlp()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    with pytest.raises(ValueError, match=r"0\.weight_quantizer .*axis 0.*\(1, 8\)"):
        model[0].weight_quantizer.amax = torch.ones(1, 8)  # would broadcast over input channels
    with pytest.raises(ValueError, match=r"0\.input_quantizer is per-tensor.*\(8,\)"):
        model[0].input_quantizer.amax = torch.ones(8)
    model[0].weight_quantizer.amax = torch.ones(8, 1)  # the keepdim shape is fine


def test_pre_quant_scale_of_the_wrong_length_is_named():
    model = mlp()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    model[0].input_quantizer.pre_quant_scale = torch.ones(5)
    with pytest.raises(ValueError, match=r"0\.input_quantizer has shape \(5,\).*8 values"):
        model(torch.randn(2, 8))


def test_zero_size_batch_names_its_index():
    model = mlp()
    batches = [torch.randn(4, 8), torch.randn(0, 8), torch.randn(4, 8)]
    with pytest.raises(mtq.CalibrationError, match=r"batch 1 .*zero size.*\(0, 8\)"):
        mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: [m(b) for b in batches])


def test_kernel_reductions_on_empty_tensors_raise_value_error():
    with pytest.raises(ValueError, match=r"empty tensor \(shape \(0, 4\)\)"):
        qk.reduce_amax(torch.empty(0, 4))
    with pytest.raises(ValueError, match="empty"):
        qk.nvfp4_global_amax(x=torch.empty(0))
    assert qk.reduce_amax(torch.empty(0, 4), axis=0).shape == (0, 1)  # no group is empty


def test_meta_model_is_refused_with_the_fix():
    with torch.device("meta"):
        model = mlp()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device.*to_empty"):
        mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8, device="meta")))
    assert [type(m) for m in model.modules()] == before


# ----- 8. temp files of killed writes ----------------------------------------------------------------


def test_save_removes_leftover_temps_of_dead_processes_only(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    target = tmp_path / "model.safetensors"
    leftover = tmp_path / f".model.safetensors.{dead_pid}.abc_12{SUFFIX}"
    leftover_dir = tmp_path / f".model.safetensors.{dead_pid}.zz9{SUFFIX}"
    live = tmp_path / f".model.safetensors.{1}.live{SUFFIX}"  # pid 1 is always running
    others = [tmp_path / ".model.safetensors.x.tmp", tmp_path / f".other.{dead_pid}.q{SUFFIX}"]
    leftover.write_bytes(b"partial")
    leftover_dir.mkdir()
    (leftover_dir / "shard").write_bytes(b"partial")
    for path in (live, *others):
        path.write_bytes(b"keep")
    model = mlp()
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(4, 8)))
    mtq.save(model, target)
    assert not leftover.exists() and not leftover_dir.exists()
    assert live.exists() and all(p.exists() for p in others)
    temps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.safetensors."))
    assert temps == sorted([live.name, others[0].name])  # and no temp of this save is left

"""Misuse refused by name before anything changes: quantize / calibrate on a compressed model, a KV
config on a model without attention, restore into a model with one more layer, and a layerwise
forward_loop that changes the batch order between its calls."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.batch_order import BatchOrderGuard, fingerprint
from quant_core.diagnostics import QuantWarning


def _mlp(extra: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)]
    if extra:
        layers.append(nn.Linear(16, 16))
    return nn.Sequential(*layers).eval()


X = torch.randn(8, 32)


def _int4_compressed() -> nn.Sequential:
    model = _mlp()
    mtq.quantize(model, copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), lambda m: m(X))
    mtq.compress(model)
    return model


def test_quantize_on_a_compressed_model_is_refused_by_name():
    model = _int4_compressed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"mtq.quantize: Sequential holds compressed layers \(0, 2\)"
    ):
        mtq.quantize(model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(X))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_calibrate_on_a_compressed_model_is_refused_by_name():
    model = _int4_compressed()
    with pytest.raises(ValueError, match=r"mtq.calibrate: .* before mtq.compress"):
        mtq.calibrate(model, "gptq", lambda m: m(X))


def test_a_kv_cache_config_on_a_model_without_attention_warns():
    kv = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    kv["quant_cfg"]["*[kv]_bmm_quantizer"] = {"num_bits": (4, 3), "axis": None}
    with pytest.warns(QuantWarning, match="no attention module with KV-cache quantizers"):
        mtq.quantize(_mlp(), kv, lambda m: m(X))


def test_a_config_without_kv_entries_does_not_warn_about_the_kv_cache(recwarn):
    mtq.quantize(_mlp(), copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(X))
    assert not [w for w in recwarn if "KV" in str(w.message)]


def test_restore_into_a_model_with_an_extra_linear_is_refused_and_changes_nothing(tmp_path):
    saved = _mlp()
    mtq.quantize(saved, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(X))
    path = tmp_path / "q.safetensors"
    mtq.save(saved, path)
    target = _mlp(extra=True)
    with pytest.raises(ValueError, match=r"no values for 3.weight, 3.bias .*did not have: 3\)"):
        mtq.restore(target, path)
    assert not any(hasattr(m, "weight_quantizer") for m in target.modules())  # unconverted


def test_restore_quantizer_state_into_a_model_with_an_extra_linear_warns_naming_it():
    saved = _mlp()
    mtq.quantize(saved, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(X))
    state = mtq.quantizer_state(saved)
    target = _mlp(extra=True)
    with pytest.warns(
        QuantWarning, match=r"quantizable module\(s\) the saved state does not have: 3"
    ):
        mtq.restore_quantizer_state(target, state)
    assert hasattr(target[0], "weight_quantizer") and not hasattr(target[3], "weight_quantizer")


def test_the_batch_order_guard_names_a_reordered_batch():
    batches = [torch.randn(2, 32) for _ in range(3)]
    order = [[0, 1, 2], [0, 2, 1]]

    def loop(model):
        for i in order.pop(0):
            model(batches[i])

    guard = BatchOrderGuard(loop)
    model = _mlp()
    guard(model)
    with pytest.raises(ValueError, match=r"different batch 1 .* on its call 2"):
        guard(model)
    assert fingerprint((batches[0],), {}) == fingerprint((batches[0].clone(),), {})
    assert fingerprint((batches[0],), {}) != fingerprint((batches[1],), {})

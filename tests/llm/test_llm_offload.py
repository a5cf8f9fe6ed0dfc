"""Calibrating a model dispatched by accelerate with CPU / disk offload gives the quantizer state,
weights and outputs of the same model calibrated in memory (tiny Llama, weights on ``meta``
between forward calls)."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

import quant_core as mtq
from quant_core.offload import has_offloaded_weights, weights_materialized
from quant_llm.testing.tiny_models import tiny_model

W4 = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}},
        "*input_quantizer": {"enable": False},
        "*lm_head*": {"enable": False},
    },
    "algorithm": "max",
}
DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _disk_offloaded(folder) -> torch.nn.Module:
    model = dispatch_model(tiny_model("llama", num_hidden_layers=3), DISK_MAP, offload_dir=folder)
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    return model


def _cpu_offloaded(_folder) -> torch.nn.Module:
    model = cpu_offload(tiny_model("llama", num_hidden_layers=3), torch.device("cpu"))
    assert model.model.layers[0].mlp.down_proj.weight.is_meta
    return model


def _calibrated(model, cfg, algorithm, forward_loop) -> torch.nn.Module:
    mtq.quantize(model, {**copy.deepcopy(cfg), "algorithm": algorithm}, forward_loop)
    return model


def _assert_same(offloaded, in_memory, batch) -> None:
    assert has_offloaded_weights(offloaded)
    with weights_materialized(offloaded):
        got = {k: v.clone() for k, v in offloaded.state_dict().items()}
    ref = in_memory.state_dict()
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key
    assert offloaded.model.layers[1].mlp.down_proj.weight.is_meta  # offloaded again
    with torch.no_grad():
        assert torch.equal(offloaded(**batch).logits, in_memory(**batch).logits)


@pytest.mark.parametrize(
    ("offload", "cfg", "algorithm"),
    [
        (_disk_offloaded, mtq.INT8_DEFAULT_CFG, "max"),
        (_disk_offloaded, W4, "gptq"),  # rewrites the .dat files of the disk-offloaded layers
        (_cpu_offloaded, W4, "gptq"),  # rewrites accelerate's CPU state dict
        (_disk_offloaded, mtq.INT8_DEFAULT_CFG, {"method": "max", "layerwise": True}),
        (_disk_offloaded, W4, {"method": "gptq", "layerwise": True}),
    ],
    ids=["disk-max", "disk-gptq", "cpu-gptq", "disk-layerwise-max", "disk-layerwise-gptq"],
)
def test_offloaded_calibration_equals_in_memory(
    tmp_path, forward_loop, calib_batches, offload, cfg, algorithm
):
    in_memory = _calibrated(tiny_model("llama", num_hidden_layers=3), cfg, algorithm, forward_loop)
    offloaded = _calibrated(offload(tmp_path), cfg, algorithm, forward_loop)
    _assert_same(offloaded, in_memory, calib_batches[0])


def test_layerwise_materializes_one_offloaded_layer_at_a_time(tmp_path, forward_loop):
    model = _disk_offloaded(tmp_path)
    layers = model.model.layers
    most = []

    def count(_module, _args):
        most.append(sum(not layer.mlp.up_proj.weight.is_meta for layer in layers[1:]))

    handles = [m.register_forward_pre_hook(count) for m in layers.modules()]
    _calibrated(model, W4, {"method": "gptq", "layerwise": True}, forward_loop)
    for handle in handles:
        handle.remove()
    assert most and max(most) == 1

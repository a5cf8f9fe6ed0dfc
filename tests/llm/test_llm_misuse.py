"""Misuse of the LLM entry points refused by name: auto_quantize arguments and step outputs, a
layerwise forward_loop that reorders batches, with_kv_cache on a model without attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
import quant_llm
from quant_core.diagnostics import QuantWarning
from quant_llm.testing.tiny_models import random_token_batches, tiny_model

DATA = random_token_batches(batches=3, seq_len=12)


def forward_step(model, batch):
    return model(**batch)


def loss_func(output, batch):
    logits = output.logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits, batch["input_ids"][:, 1:].flatten())


def _search(model=None, **kw):
    args = {
        "constraints": {"effective_bits": 6.0},
        "quantization_formats": ["INT4_AWQ_CFG", None],
        "data_loader": DATA,
        "forward_step": forward_step,
        "loss_func": loss_func,
        "num_calib_steps": 2,
        "num_score_steps": 2,
        "verbose": False,
        **kw,
    }
    return mtq.auto_quantize(model if model is not None else tiny_model("llama"), **args)


@pytest.fixture
def untouched(monkeypatch):
    """Fail if any candidate is calibrated: the refusal under test must come first."""
    import quant_llm.auto_quantize as aq

    def refuse(*_args, **_kwargs):
        raise AssertionError("candidates were calibrated before the refusal")

    monkeypatch.setattr(aq, "calibrate_candidates", refuse)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"constraints": {"effective_bits": "six"}}, r"constraints\['effective_bits'\] must be a positive number"),
        ({"constraints": {"effective_bits": float("nan")}}, "must be a positive number"),
        ({"constraints": {"weight_bytes": -1}}, r"constraints\['weight_bytes'\] must be a positive"),
        ({"constraints": {"bits": 4}}, "unknown constraint 'bits'"),
        ({"num_score_steps": 0}, "num_score_steps must be a positive number of batches, got 0"),
        ({"num_calib_steps": 1.5}, "num_calib_steps must be a positive number of batches"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_calibration(untouched, kw, message):
    with pytest.raises(ValueError, match=message):
        _search(**kw)


def test_kl_with_a_scalar_forward_step_output_is_refused(untouched):
    def scalar_step(model, batch):
        return loss_func(model(**batch), batch)

    with pytest.raises(
        ValueError, match=r"method='kl' needs forward_step to return the logits.*shape \(\)"
    ):
        _search(method="kl", forward_step=scalar_step, loss_func=None)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda out, batch: out.logits.sum() * float("nan"), "loss_func returned nan"),
        (lambda out, batch: out.logits.mean(-1), r"tensor of shape \(2, 12\).*\.mean\(\)"),
        (lambda out, batch: 1.0, "loss_func returned float"),
    ],
)
def test_a_loss_that_is_not_a_finite_scalar_is_refused(untouched, bad, message):
    with pytest.raises(ValueError, match=message):
        _search(loss_func=bad)


def test_a_nan_loss_in_a_later_score_batch_is_named():
    calls = []

    def late_nan(out, batch):
        calls.append(1)
        loss = loss_func(out, batch)
        return loss * float("nan") if len(calls) == 3 else loss  # probe, batch 0, batch 1

    with pytest.raises(ValueError, match="loss_func returned nan for score batch 1"):
        _search(loss_func=late_nan)


def test_a_one_shot_generator_drained_by_calibration_is_named(untouched):
    with pytest.raises(ValueError, match=r"one-shot iterator .* took all 3 of its batches"):
        _search(data_loader=(b for b in DATA), num_calib_steps=512, num_score_steps=128)


def test_layerwise_calibration_with_a_shuffling_loop_is_refused_by_name():
    batches = random_token_batches(batches=3, seq_len=12)
    calls = []

    def shuffled(model):
        calls.append(1)
        order = [0, 1, 2] if len(calls) == 1 else [2, 0, 1]
        for i in order:
            model(**batches[i])

    cfg = {**copy.deepcopy(mtq.INT8_DEFAULT_CFG), "algorithm": {"method": "max", "layerwise": True}}
    with pytest.raises(
        ValueError, match=r"forward_loop gave the model a different batch 0 .*shuffle=False"
    ):
        mtq.quantize(tiny_model("llama", num_hidden_layers=3), cfg, shuffled)


def test_layerwise_calibration_with_a_fixed_loop_is_unchanged_by_the_guard():
    batches = random_token_batches(batches=2, seq_len=12)

    def loop(model):
        for b in batches:
            model(**b)

    cfg = {**copy.deepcopy(mtq.INT8_DEFAULT_CFG), "algorithm": {"method": "max", "layerwise": True}}
    model = mtq.quantize(tiny_model("llama", num_hidden_layers=2), cfg, loop)
    amax = model.model.layers[1].mlp.down_proj.input_quantizer.amax
    assert amax is not None and bool((amax > 0).all())


def test_with_kv_cache_on_a_model_without_attention_says_so():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    cfg = quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)
    with pytest.warns(QuantWarning, match="no attention module with KV-cache quantizers"):
        mtq.quantize(model, cfg, lambda m: m(torch.randn(4, 16)))


def test_with_kv_cache_on_a_llama_does_not_warn(recwarn):
    cfg = quant_llm.with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG)
    mtq.quantize(tiny_model("llama"), cfg, lambda m: [m(**b) for b in DATA[:1]])
    assert not [w for w in recwarn if "KV-cache quantizers" in str(w.message)]

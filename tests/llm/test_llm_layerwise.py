"""Layer-by-layer calibration (``"layerwise"`` algorithm option) on a tiny Llama built from its config.

``max`` with float activations between layers (the default) sees exactly the tensors a whole-model
pass sees, so every quantizer ends bit-identical; the other algorithms are checked against the
same algorithm run on each layer's own inputs, recorded independently with forward pre-hooks.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import quant_core as mtq
from quant_core.algorithms import get_algorithm
from quant_core.config.algorithm_configs import GPTQCalibConfig, MaxCalibConfig
from quant_core.layerwise import decoder_layers, split_layerwise
from quant_llm.testing.tiny_models import tiny_model

INT8 = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
W4 = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}},
        "*input_quantizer": {"enable": False},
        "*lm_head*": {"enable": False},
    },
    "algorithm": "max",
}


def _quantized(cfg: dict, algorithm, forward_loop, layers: int = 3) -> torch.nn.Module:
    model = tiny_model("llama", num_hidden_layers=layers)
    mtq.quantize(model, {**copy.deepcopy(cfg), "algorithm": algorithm}, forward_loop)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_layerwise_max_gives_the_whole_model_quantizer_state(forward_loop, calib_batches):
    normal = _quantized(INT8, "max", forward_loop)
    layerwise = _quantized(INT8, {"method": "max", "layerwise": True}, forward_loop)
    _assert_same(normal, layerwise)
    assert any(k.endswith("input_quantizer._amax") for k in _state(layerwise))
    with torch.no_grad():
        torch.testing.assert_close(
            layerwise(**calib_batches[0]).logits, normal(**calib_batches[0]).logits, rtol=0, atol=0
        )


def test_layerwise_calibrates_enabled_quantizers_after_the_stack(forward_loop):
    cfg = copy.deepcopy(INT8)
    cfg["quant_cfg"]["*lm_head*"] = {"num_bits": 8, "axis": None}
    normal = _quantized(cfg, "max", forward_loop)
    layerwise = _quantized(cfg, MaxCalibConfig(layerwise={"enable": True}), forward_loop)
    assert normal.lm_head.input_quantizer.amax is not None
    _assert_same(normal, layerwise)


def _per_layer_reference(method: dict, forward_loop, qdq: bool) -> torch.nn.Module:
    """The same algorithm on each layer alone, its inputs recorded by plain pre-hooks on the model
    whose earlier layers are already calibrated and made deployable (qdq), or on a copy with
    weights max-calibrated (what a whole-model calibration pass computes with)."""
    model = _quantized(W4, None, None)
    one_pass = _quantized(W4, "max", None)
    fn = get_algorithm(method["method"])
    options = {k: v for k, v in method.items() if k != "method"}
    for index, layer in enumerate(model.model.layers):
        source = model if qdq else one_pass
        recorded = []

        def hook(_m, args, kwargs, recorded=recorded):
            recorded.append((args, {**kwargs, "cache": None}))

        handle = source.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            forward_loop(source)
        handle.remove()

        def replay(m, recorded=recorded):
            for args, kwargs in recorded:
                m(*args, **kwargs)

        with torch.no_grad():
            fn(layer, replay, **options)
            # each layer made deployable before the next one's inputs are recorded from it
            args, kwargs = recorded[0]
            probe = functools.partial(layer, *args, **kwargs)
            mtq.make_deployable(model, prefix=f"model.layers.{index}.", probe=probe)
    return model


@pytest.mark.filterwarnings("ignore:quantizer .* never calibrated")
@pytest.mark.parametrize(
    ("method", "qdq"),
    [
        ({"method": "gptq"}, True),
        ({"method": "awq_gptq", "alpha_step": 0.5}, True),
        ({"method": "awq_lite", "alpha_step": 0.5}, False),
    ],
)
def test_layerwise_runs_the_algorithm_on_each_layers_own_inputs(forward_loop, method, qdq):
    got = _quantized(W4, {**method, "layerwise": True}, forward_loop)
    ref = _per_layer_reference(method, forward_loop, qdq)
    _assert_same(got, ref)


def test_layerwise_gptq_differs_from_whole_model_gptq(forward_loop):
    """With quantized activations from earlier layers (GPTQ's default), later layers see other
    inputs than in one whole-model pass, so their weights come out differently."""
    whole = _quantized(W4, "gptq", forward_loop)
    layerwise = _quantized(W4, GPTQCalibConfig(layerwise=True), forward_loop)
    first = "model.layers.0.mlp.down_proj.weight"
    last = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(_state(whole)[first], _state(layerwise)[first])
    assert not torch.equal(_state(whole)[last], _state(layerwise)[last])


@pytest.mark.filterwarnings("ignore:quantizer .* never calibrated")
def test_layerwise_auto_is_layerwise_with_a_stack_and_whole_model_without(forward_loop):
    """INT4_AWQ_CFG's ``"layerwise": "auto"``: on a decoder stack, the same as layerwise with
    quantized activations from the previous layer; on a model without one, the whole-model run."""
    method = {"method": "awq_gptq", "alpha_step": 0.5}
    auto = _quantized(W4, {**method, "layerwise": "auto"}, forward_loop)
    _assert_same(auto, _per_layer_reference(method, forward_loop, qdq=True))

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    data = [torch.randn(16, 64) for _ in range(2)]
    runs = []
    for algorithm in ({**method, "layerwise": "auto"}, method):
        model = copy.deepcopy(mlp)
        mtq.quantize(
            model, {**copy.deepcopy(W4), "algorithm": algorithm}, lambda m: [m(x) for x in data]
        )
        runs.append(model)
    _assert_same(*runs)
    assert not torch.equal(runs[0][0].weight, mlp[0].weight)


def test_layerwise_options_are_validated():
    assert split_layerwise("gptq", {"layerwise": True})[1].get_qdq_activations_from_prev_layer
    assert split_layerwise("awq_gptq", {"layerwise": True})[1].get_qdq_activations_from_prev_layer
    auto = split_layerwise("awq_gptq", {"layerwise": "auto"})[1]
    assert auto.enable and auto.get_qdq_activations_from_prev_layer and auto.when_stacked
    assert not split_layerwise("max", {"layerwise": True})[1].get_qdq_activations_from_prev_layer
    with pytest.raises(ValueError, match="checkpoint_dir"):
        split_layerwise("max", {"layerwise": {"enable": True, "checkpoint_dir": "layerwise_ckpt"}})
    with pytest.raises(ValueError, match="must be a bool"):
        split_layerwise("max", {"layerwise": {"enable": "yes"}})
    with pytest.raises(ValueError, match="stack of decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_layerwise_refuses_a_forward_loop_that_changes_between_calls(calib_batches):
    calls = []

    def shrinking(model):
        calls.append(1)
        for batch in calib_batches[: 3 - len(calls)]:
            model(**batch)

    model = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(RuntimeError, match="same batches in the same order"):
        mtq.quantize(
            model,
            {**copy.deepcopy(INT8), "algorithm": {"method": "max", "layerwise": True}},
            shrinking,
        )


def test_a_forward_loop_reading_logits_and_loss_runs_layer_by_layer(calib_batches, forward_loop):
    """Passes that stop at a decoder layer return the first (float) pass's output shapes."""
    seen = []

    def reading_loop(model):
        for batch in calib_batches:
            out = model(**batch, labels=batch["input_ids"])
            seen.append(
                (tuple(out.logits.shape), tuple(out.loss.shape), out.logits.argmax(-1).shape)
            )

    method = {"method": "awq_gptq", "alpha_step": 0.5, "layerwise": True}
    got = _quantized(W4, method, reading_loop)
    expected = ((*calib_batches[0]["input_ids"].shape, got.config.vocab_size), ())
    assert len(seen) > len(calib_batches) and all(s[:2] == expected for s in seen)
    _assert_same(got, _quantized(W4, method, forward_loop))  # reading changes nothing


def test_the_first_pass_computes_only_the_first_layer(forward_loop, calib_batches):
    """The first pass keeps only output shapes, so later layers echo the first one's output: a
    middle layer computes once to be calibrated and once to feed the next layer, no more."""
    model = tiny_model("llama", num_hidden_layers=3)
    calls = []
    model.model.layers[1].mlp.register_forward_hook(lambda *_: calls.append(1))
    mtq.quantize(
        model, {**copy.deepcopy(INT8), "algorithm": MaxCalibConfig(layerwise=True)}, forward_loop
    )
    assert len(calls) == 2 * len(calib_batches)

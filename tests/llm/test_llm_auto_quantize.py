"""auto_quantize: budget, grouping, choice where harmless, clear errors, exact replay, save/restore."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
from quant_llm.testing.tiny_models import random_token_batches, tiny_model

DATA = random_token_batches(batches=3, seq_len=12)
INT4_BITS = 4 + 16 / 128  # INT4 codes + one fp16 scale per 128 weights
FP8_BITS = 8.0


def forward_step(model, batch):
    return model(**batch)


def loss_func(output, batch):
    logits = output.logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits, batch["input_ids"][:, 1:].flatten())


def _calib_loop(model):
    with torch.no_grad():
        for batch in DATA[:2]:
            forward_step(model, batch)


def _search(model, formats, budget, **kw):
    kw = {
        "num_calib_steps": 2,
        "num_score_steps": 2,
        "verbose": False,
        "loss_func": loss_func,
        **kw,
    }
    return mtq.auto_quantize(
        model,
        constraints=budget,
        quantization_formats=formats,
        data_loader=DATA,
        forward_step=forward_step,
        **kw,
    )


@pytest.fixture(scope="module")
def awq_search():
    fp = tiny_model("llama")
    model, state = _search(
        copy.deepcopy(fp), ["INT4_AWQ_CFG", "FP8_DEFAULT_CFG", None], {"effective_bits": 6.0}
    )
    return fp, model, state


def _bits_of(name: str) -> float:
    return {
        "INT4_AWQ_CFG": INT4_BITS,
        "FP8_DEFAULT_CFG": FP8_BITS,
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": INT4_BITS,
    }.get(name, 16.0)


def test_budget_met_and_bits_recomputed_independently(awq_search):
    fp, _model, state = awq_search
    params = {n: fp.get_submodule(n).weight.numel() for n in state["choice"]}
    bits = sum(params[n] * _bits_of(c) for n, c in state["choice"].items()) / sum(params.values())
    assert bits == pytest.approx(state["effective_bits"], rel=1e-12)
    assert bits <= 6.0
    assert "lm_head" not in state["choice"]  # the configs' default exclusion holds
    assert set(state["choice"].values()) - {"None"}, "a 6-bit budget leaves room to quantize"


def test_best_summarises_the_pick_as_modelopt_does(awq_search):
    _fp, _model, state = awq_search
    best = state["best"]
    assert best["recipe"] == state["choice"] and best["is_satisfied"] is True
    assert best["constraints"] == {"effective_bits": pytest.approx(state["effective_bits"])}
    chosen = {
        state["layers"][n]["group"]: state["candidates"].index(c)
        for n, c in state["choice"].items()
    }
    expected = sum(state["scores"][g][i] for g, i in chosen.items())
    assert best["score"] == pytest.approx(expected, rel=1e-12)
    assert best["score"] <= sum(max(s) for s in state["scores"].values())


def test_unknown_score_method_is_refused():
    with pytest.raises(ValueError, match=r"choose one of .*'kl_div'"):
        _search(
            tiny_model("llama"), ["FP8_DEFAULT_CFG", None], {"effective_bits": 12}, method="kld"
        )


def test_memory_budget_in_bytes():
    fp = tiny_model("llama")
    linears = {
        n: m.weight.numel()
        for n, m in fp.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    budget = sum(linears.values()) * 6 / 8  # 6 bits per weight, in bytes
    _m, state = _search(fp, ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None], {"weight_bytes": budget})
    used = sum(linears[n] * _bits_of(c) for n, c in state["choice"].items()) / 8
    assert used <= budget and used == pytest.approx(state["weight_bytes"])


def test_grouping_qkv_gate_up_share_a_format(awq_search):
    choice = awq_search[2]["choice"]
    for i in range(2):
        p = f"model.layers.{i}"
        assert len({choice[f"{p}.self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert choice[f"{p}.mlp.gate_proj"] == choice[f"{p}.mlp.up_proj"]


def test_fused_moe_experts_are_one_unit():
    model, state = _search(
        tiny_model("mixtral"), ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None], {"effective_bits": 10.0}
    )
    assert "model.layers.0.mlp.experts" in state["choice"]
    assert not any(".quant_" in n for n in state["choice"])
    experts = model.model.layers[0].mlp.experts
    on = {
        q.is_enabled
        for n, q, _p in mtq.conversion.iter_quantizers(experts)
        if "weight_quantizer" in n  # ...experts.gate_up_proj_weight_quantizers.3
    }
    assert len(on) == 1  # every expert got the same choice


@pytest.mark.parametrize("method", ["gradient", "kl", "kl_div"])  # kl_div: ModelOpt's name
def test_picks_int4_where_it_is_lossless(method):
    fp = tiny_model("llama")
    gen = torch.Generator().manual_seed(1)
    mlp, attn = 0, 0
    with torch.no_grad():
        for n, m in fp.named_modules():
            if (
                isinstance(m, torch.nn.Linear) and ".mlp." in n
            ):  # integers in [-7, 7] with a 7 per row: INT4 exact
                m.weight.copy_(torch.randint(-7, 8, m.weight.shape, generator=gen).float() * 0.02)
                m.weight[:, 0] = 7 * 0.02
                mlp += m.weight.numel()
            elif isinstance(m, torch.nn.Linear) and "lm_head" not in n:
                attn += m.weight.numel()
    budget = (mlp * INT4_BITS + attn * 16) / (mlp + attn)
    _m, state = _search(
        fp, ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None], {"effective_bits": budget}, method=method
    )
    for name, c in state["choice"].items():
        assert c == ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG" if ".mlp." in name else "None"), name
        if ".mlp." in name:
            assert state["scores"][state["layers"][name]["group"]][0] == pytest.approx(0, abs=1e-9)


def test_budget_below_cheapest_is_refused():
    with pytest.raises(ValueError, match="below the cheapest"):
        _search(
            tiny_model("llama"),
            ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG"],
            {"effective_bits": 3.0},
        )


def test_unknown_format_name_is_refused():
    with pytest.raises(ValueError, match="unknown quantization format 'INT3_CFG'"):
        _search(tiny_model("llama"), ["INT3_CFG", None], {"effective_bits": 6.0})


def test_empty_data_loader_is_refused():
    with pytest.raises(ValueError, match="data_loader gave no batch"):
        mtq.auto_quantize(
            tiny_model("llama"),
            constraints={"effective_bits": 6.0},
            quantization_formats=["FP8_DEFAULT_CFG", None],
            data_loader=[],
            forward_step=forward_step,
            loss_func=loss_func,
            verbose=False,
        )


def test_replay_reproduces_the_searched_model_with_awq_scales(awq_search):
    fp, model, state = awq_search
    assert "INT4_AWQ_CFG" in state["choice"].values()
    replay = mtq.quantize(copy.deepcopy(fp), mtq.get_auto_quantize_config(state), _calib_loop)
    searched = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    float_params = dict(fp.named_parameters())
    folded = [  # calibration folded the AWQ scales into the norms before the AWQ layers
        n
        for n, p in model.named_parameters()
        if n.endswith("layernorm.weight") and not torch.equal(p, float_params[n])
    ]
    assert folded, "AWQ scales live in the norms"
    replayed = {**dict(replay.named_parameters()), **dict(replay.named_buffers())}
    assert replayed.keys() == searched.keys()
    for n, b in replayed.items():
        torch.testing.assert_close(b, searched[n], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(model(**DATA[2]).logits, replay(**DATA[2]).logits)


def test_save_restore_keeps_the_result(awq_search, tmp_path):
    fp, model, _state = awq_search
    mtq.save(model, tmp_path / "aq.pt")
    restored = mtq.restore(copy.deepcopy(fp), tmp_path / "aq.pt")
    with torch.no_grad():
        assert torch.equal(model(**DATA[2]).logits, restored(**DATA[2]).logits)


def test_plot_sensitivity_writes_a_png(awq_search, tmp_path):
    mtq.plot_sensitivity(awq_search[2], tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_scores_equal_a_float64_fisher_reference():
    """Each group's INT8 score is sum((dL/dY * X (Wq - W)^T)^2) over the score batches, recomputed
    here in float64 from the definition of per-channel INT8 (scale = row amax / 127, ties to even).
    The search needs no weight gradient: the model comes back with its weights trainable and no .grad."""
    fp = tiny_model("llama")
    _m, state = _search(copy.deepcopy(fp), ["INT8_WEIGHT_ONLY_CFG", None], {"effective_bits": 12.0})
    ref = copy.deepcopy(fp).double()
    linears = {n: m for n, m in ref.named_modules() if n in state["layers"]}
    inputs, outputs = {}, {}

    def keep(name):
        def hook(_m, args, out):
            inputs.setdefault(name, []).append(args[0].detach())
            out.retain_grad()
            outputs.setdefault(name, []).append(out)

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    for batch in DATA[:2]:  # a list loader: the score batches are its first two
        loss_func(forward_step(ref, batch), batch).backward()
    for h in handles:
        h.remove()
    expected: dict[str, float] = {}
    for name, m in linears.items():
        w = m.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        delta = torch.round(w / scale) * scale - w
        fisher = sum(
            float(((y.grad * (x @ delta.T)) ** 2).sum())
            for x, y in zip(inputs[name], outputs[name], strict=True)
        )
        group = state["layers"][name]["group"]
        expected[group] = expected.get(group, 0.0) + fisher
    for group, value in expected.items():
        assert state["scores"][group][0] == pytest.approx(value, rel=1e-3), group
        assert state["scores"][group][1] == 0.0
    assert all(p.requires_grad and p.grad is None for p in _m.parameters())


def test_effective_bits_attribute_overrides_the_format_cost():
    from quant_llm.auto_quantize.candidates import weight_bits

    def quantized(attrs):
        return mtq.quantize(nn.Linear(32, 8), {"quant_cfg": {"*weight_quantizer": attrs}}, None)

    nvfp4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    assert weight_bits(quantized(nvfp4)) == 4 + 8 / 16  # E2M1 codes + one E4M3 scale per 16
    assert weight_bits(quantized({**nvfp4, "effective_bits": 4.75})) == 4.75


def test_checkpoint_saves_scores_and_a_second_search_reuses_them(tmp_path, monkeypatch):
    """ModelOpt's ``checkpoint``: the first search writes its scores, the next (another budget)
    reads them instead of scoring again; a file for another search is refused by name."""
    import quant_llm.auto_quantize as aq

    path = tmp_path / "search.json"
    formats = ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", None]
    fp = tiny_model("llama")
    _m, first = _search(copy.deepcopy(fp), formats, {"effective_bits": 10.0}, checkpoint=path)
    assert path.exists()

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again instead of reading the checkpoint")

    monkeypatch.setattr(aq, "gradient_scores", no_scoring)
    _m, second = _search(copy.deepcopy(fp), formats, {"effective_bits": 6.0}, checkpoint=path)
    assert second["scores"] == first["scores"]
    assert first["effective_bits"] <= 10.0 and second["effective_bits"] <= 6.0
    with pytest.raises(ValueError, match="written for other method"):
        _search(copy.deepcopy(fp), formats, {"effective_bits": 6.0}, checkpoint=path, method="kl")
    path.write_text("not json")
    with pytest.raises(ValueError, match="is not a search-state file"):
        _search(copy.deepcopy(fp), formats, {"effective_bits": 6.0}, checkpoint=path)


def test_search_state_round_trips_through_file_objects(awq_search):
    """The search state is plain data: torch.save / torch.load(weights_only=True) and JSON keep it."""
    import io
    import json

    _fp, _model, state = awq_search
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded == state
    text = io.StringIO()
    json.dump(state, text)
    again = json.loads(text.getvalue())
    assert again["best"]["recipe"] == state["best"]["recipe"]
    assert again["choice"] == state["choice"] and again["scores"] == state["scores"]

"""auto_quantize's approximate gradient score and its whole-model budget (``count_excluded``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
from quant_llm.auto_quantize.approx_scoring import approx_gradient_scores
from quant_llm.testing.tiny_models import random_token_batches, tiny_model

DATA = random_token_batches(batches=4, seq_len=12)
INT4_BITS = 4 + 16 / 128


def forward_step(model, batch):
    return model(**batch)


def loss_func(output, batch):
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def _search(model, formats, budget, **kw):
    kw = {"num_calib_steps": 2, "num_score_steps": 2, "verbose": False, **kw}
    return mtq.auto_quantize(model, budget, formats, DATA, forward_step, loss_func, **kw)


class _Counter(nn.Module):
    """Identity that counts its calls: shows whether a forward went past the searched layers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


class _TwoHeads(nn.Module):
    """Two linear layers reading one input tensor (like q/k/v), then a third on their product.

    ``a``/``b`` are narrow in, wide out: their weight-only candidates are scored through the shared
    Gram matrix; ``out`` is wide in, narrow out: running its candidates is cheaper."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 40)
        self.b = nn.Linear(6, 40)
        self.out = nn.Linear(40, 3)
        self.tail = _Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.out(torch.tanh(self.a(x)) * self.b(x)))


def _rounded(layer: nn.Linear, step: float) -> nn.Linear:
    """A weight-only candidate: the layer with its weight rounded to multiples of ``step``."""
    cand = copy.deepcopy(layer)
    with torch.no_grad():
        cand.weight.copy_(torch.round(layer.weight / step) * step)
    return cand


class _InputRounded(nn.Module):
    """A candidate that also rounds its input (an activation format): not a plain linear map."""

    def __init__(self, layer: nn.Linear, step: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.round(x / self.step) * self.step, self.weight, self.bias)


def test_approx_scores_equal_a_float64_reference():
    """Score of a candidate = sum_j mean_t(g_tj^2 over the gradient batches) * sum_t dY_tj^2 over
    every batch, times (exact score / that estimate) on the gradient batches, recomputed here in
    float64 from the layer inputs and gradients; weight-only candidates (through the shared Gram
    matrix of ``a``/``b``) and an input-rounding one alike. Forward-only batches stop after the
    last searched layer."""
    torch.manual_seed(0)
    model = _TwoHeads()
    batches = [torch.randn(3, 7, 6) for _ in range(4)]
    target = [torch.randn(3, 7, 3) for _ in range(4)]
    layers = {
        "a": [_rounded(model.a, 0.05), _InputRounded(model.a, 0.25), None],
        "b": [_rounded(model.b, 0.05), _InputRounded(model.b, 0.25), None],
        "out": [_rounded(model.out, 0.1), _InputRounded(model.out, 0.25), None],
    }
    index = {id(x): i for i, x in enumerate(batches)}

    def step(m, x):
        return m(x)

    def loss(out, x):
        return ((out - target[index[id(x)]]) ** 2).sum()

    scores = approx_gradient_scores(model, layers, batches, step, loss, 1, verbose=False)
    assert model.tail.calls == 1  # only the gradient batch ran past the last searched layer
    assert all(p.requires_grad and p.grad is None for p in model.parameters())

    ref = copy.deepcopy(model).double()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}

    def keep(name):
        def hook(_m, args, out):
            if out.requires_grad:
                out.retain_grad()
            seen[name].append((args[0].detach(), out))

        return hook

    handles = [ref.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    x0 = batches[0].double()
    ((ref(x0) - target[0].double()) ** 2).sum().backward()
    with torch.no_grad():
        for x in batches[1:]:
            ref(x.double())
    for h in handles:
        h.remove()
    for name, cands in layers.items():
        _x, y_first = seen[name][0]
        grad = y_first.grad.reshape(-1, y_first.shape[-1])
        grad_sq = grad.pow(2).mean(0)
        for i, cand in enumerate(cands):
            if cand is None:
                assert scores[name][i] == 0.0
                continue
            c = copy.deepcopy(cand).double()
            with torch.no_grad():
                errors = [(c(x) - y.detach()).reshape(-1, y.shape[-1]) for x, y in seen[name]]
            estimate = float((grad_sq * sum(e.pow(2).sum(0) for e in errors)).sum())
            exact_first = float((grad * errors[0]).pow(2).sum())
            estimate_first = float((grad_sq * errors[0].pow(2).sum(0)).sum())
            expected = estimate * exact_first / estimate_first
            assert expected != pytest.approx(estimate, rel=1e-3)  # the correction is not 1 here
            assert scores[name][i] == pytest.approx(expected, rel=1e-4), (name, i)


def test_gram_or_run_by_multiply_adds():
    from quant_llm.auto_quantize.approx_scoring import _gram_is_cheaper

    tokens = 4 * 1024  # SmolLM2's benchmark: 4 batches of 2 x 512 tokens, 2 weight-only candidates
    assert _gram_is_cheaper(576, 576, 2, tokens)  # q_proj: 576^2 + 2*576^2*576/T < 2*576*576
    assert _gram_is_cheaper(576, 1536, 2, tokens)  # gate_proj
    assert not _gram_is_cheaper(1536, 576, 2, tokens)  # down_proj: 1536 * 5248 > 1152 * 4096
    assert _gram_is_cheaper(6, 40, 1, 84)  # _TwoHeads.a / .b
    assert not _gram_is_cheaper(40, 3, 1, 84)  # _TwoHeads.out


def test_approx_equals_exact_where_the_gradient_is_constant_per_channel():
    """With a loss linear in the last layer's output, dL/dY is the same for every token, so the
    approximate score of that layer is the exact one (both methods, same search)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    data = [torch.randn(5, 8) for _ in range(6)]
    weights = torch.randn(4)

    def run(method):
        return mtq.auto_quantize(
            copy.deepcopy(model),
            {"effective_bits": 12.0},
            ["INT8_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG", None],
            data,
            lambda m, x: m(x),
            lambda out, _x: (out * weights).sum(),
            num_calib_steps=2,
            num_score_steps=4,
            method=method,
            verbose=False,
        )[1]

    exact, approx = run("gradient"), run("gradient_approx")
    for i in range(2):  # INT8 weight-only (Gram path) and FP8 weights + inputs (run per batch)
        assert approx["scores"]["2"][i] == pytest.approx(exact["scores"]["2"][i], rel=1e-4)
        assert approx["scores"]["2"][i] > 0


def test_approx_search_on_a_transformer_matches_the_exact_choice_where_it_is_clear():
    """Layers whose weights INT4 holds exactly score 0 under both scores and get INT4."""
    fp = tiny_model("llama")
    gen = torch.Generator().manual_seed(1)
    mlp, attn = 0, 0
    with torch.no_grad():
        for n, m in fp.named_modules():
            if isinstance(m, nn.Linear) and ".mlp." in n:
                m.weight.copy_(torch.randint(-7, 8, m.weight.shape, generator=gen).float() * 0.02)
                m.weight[:, 0] = 7 * 0.02
                mlp += m.weight.numel()
            elif isinstance(m, nn.Linear) and "lm_head" not in n:
                attn += m.weight.numel()
    budget = (mlp * INT4_BITS + attn * 16) / (mlp + attn)
    int4_max = {**mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, "algorithm": "max"}
    _m, state = _search(fp, [int4_max, None], {"effective_bits": budget}, method="gradient_approx")
    for name, c in state["choice"].items():
        assert c == ("custom_0" if ".mlp." in name else "None"), name
        if ".mlp." in name:
            assert state["scores"][state["layers"][name]["group"]][0] == pytest.approx(0, abs=1e-12)


def test_count_excluded_counts_lm_head_at_16_bits():
    fp = tiny_model("llama")
    linears = {n: m.weight.numel() for n, m in fp.named_modules() if isinstance(m, nn.Linear)}
    head = linears["lm_head"]
    _m, plain = _search(copy.deepcopy(fp), ["INT8_WEIGHT_ONLY_CFG", None], {"effective_bits": 10.0})
    assert plain["whole_model"]["excluded"] == {"lm_head": head}
    searched = sum(v for n, v in linears.items() if n != "lm_head")
    used = plain["effective_bits"] * searched
    whole = (used + 16 * head) / (searched + head)
    assert plain["whole_model"]["effective_bits"] == pytest.approx(whole, rel=1e-12)
    assert whole > 10.0  # counted over every Linear, the searched-layers budget overshoots

    _m, counted = _search(
        copy.deepcopy(fp),
        ["INT8_WEIGHT_ONLY_CFG", None],
        {"effective_bits": 12.0},
        count_excluded=True,
    )
    bits = {"INT8_WEIGHT_ONLY_CFG": 8.0, "None": 16.0}
    total = sum(linears[n] * bits[c] for n, c in counted["choice"].items()) + 16 * head
    assert total / sum(linears.values()) <= 12.0
    assert counted["best"]["constraints"]["effective_bits"] == pytest.approx(
        total / sum(linears.values()), rel=1e-12
    )
    assert counted["best"]["is_satisfied"]
    with pytest.raises(ValueError, match="leave no bits for the searched layers"):
        _search(
            copy.deepcopy(fp),
            ["INT8_WEIGHT_ONLY_CFG", None],
            {"effective_bits": 16 * head / sum(linears.values())},
            count_excluded=True,
        )


@pytest.mark.parametrize("steps", [0, 1.5, True])
def test_num_gradient_steps_must_be_a_positive_count(steps):
    with pytest.raises(ValueError, match="num_gradient_steps must be a positive number"):
        _search(
            tiny_model("llama"),
            ["INT8_WEIGHT_ONLY_CFG", None],
            {"effective_bits": 10.0},
            method="gradient_approx",
            num_gradient_steps=steps,
        )

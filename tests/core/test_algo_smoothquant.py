"""SmoothQuant: scales follow the formula, keep the float output, and lower the W8A8 error."""

from __future__ import annotations

import torch
from algo_refs import int_quant
from torch import nn

from quant_core.algorithms.smoothquant import search_smoothing, smoothing_scales
from quant_core.algorithms.statistics import collect_input_stats
from quant_core.algorithms.weights import BlockFormat


def outlier_activations(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    x[:, :3] *= 60.0  # a few outlier channels, as in LLM/BERT activations
    return x


def test_smoothing_scales_follow_formula_in_float64():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(16, generator=gen, dtype=torch.float64) * 10 + 0.1
    w = torch.rand(16, generator=gen, dtype=torch.float64) + 0.05
    for alpha in (0.0, 0.3, 0.5, 1.0):
        ref = torch.tensor(
            [a[j].item() ** alpha / w[j].item() ** (1 - alpha) for j in range(16)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(smoothing_scales(a, w, alpha), ref, rtol=1e-12, atol=0)
    both = smoothing_scales(a, w, torch.tensor([0.2, 0.8], dtype=torch.float64))
    assert both.shape == (2, 16)


def test_smoothing_keeps_float_output():
    x = outlier_activations(64, 32, seed=1)
    w = torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-12)


def test_searched_alpha_lowers_w8a8_error_vs_no_smoothing():
    x = outlier_activations(256, 64, seed=3)
    w = torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.1
    q8 = int_quant(8)
    wfmt = BlockFormat(q8, block=None)
    act_amax = x.abs().amax(0)
    alpha, s = search_smoothing(w, x, act_amax, wfmt, q8)

    def w8a8_error(scales):
        xs = x / scales
        xq = q8(xs, xs.abs().max())
        ws = w * scales
        wq = q8(ws, ws.abs().amax(1, keepdim=True))
        return float((xq @ wq.T - x @ w.T).square().sum())

    plain = w8a8_error(torch.ones(64, dtype=torch.float64))
    assert 0.0 < alpha <= 1.0
    assert w8a8_error(s.double()) < 0.5 * plain


def test_collect_input_stats_matches_float64_and_shares_identical_inputs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    torch.manual_seed(5)
    model = Block().double()
    batches = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(3)]

    def loop():
        for b in batches:
            model(b)

    stats = collect_input_stats(
        {"q": model.q, "k": model.k, "o": model.o}, loop, gram=True, samples=4
    )
    flat = torch.cat([b.reshape(-1, 6) for b in batches])
    for name in ("q", "k"):
        torch.testing.assert_close(stats[name].amax.double(), flat.abs().amax(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(
            stats[name].abs_mean.double(), flat.abs().mean(0), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(stats[name].gram.double(), flat.T @ flat, rtol=1e-5, atol=1e-5)
        assert stats[name].count == 30
        assert stats[name].sample_matrix(5).shape == (5, 6)
    hidden = torch.cat([(model.q(b) + model.k(b)).reshape(-1, 4) for b in batches]).detach()
    torch.testing.assert_close(stats["o"].amax.double(), hidden.abs().amax(0), rtol=1e-6, atol=0)


class TwoLayer(nn.Module):
    """Two Linears fed activations with a few outlier channels (the SmoothQuant setting)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.linspace(0.5, 30.0, 96)  # outlier channels into fc2
        return self.fc2(h)


def _model_and_data():
    torch.manual_seed(7)
    model = TwoLayer().eval()
    x = outlier_activations(256, 64, seed=8).float()
    return model, [x[i : i + 64] for i in range(0, 256, 64)]


def test_smoothquant_model_keeps_float_output_with_quantizers_off():
    import copy

    import quant_core as mtq

    model, data = _model_and_data()
    reference = copy.deepcopy(model)
    mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG, lambda m: [m(b) for b in data])
    scales = model.fc2.input_quantizer.pre_quant_scale
    assert scales is not None and float(scales.max() / scales.min()) > 2.0
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        expected = reference(data[0])
        tol = 1e-5 * float(expected.abs().max())  # float32 rounding of the rescaled products
        torch.testing.assert_close(model(data[0]), expected, rtol=0, atol=tol)


def test_smoothquant_model_w8a8_error_below_max_calibration():
    import copy

    import quant_core as mtq

    model, data = _model_and_data()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])

    def error(config):
        m = copy.deepcopy(model)
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return float((torch.cat([m(b) for b in data]) - ref).square().sum())

    assert error(mtq.INT8_SMOOTHQUANT_CFG) < 0.5 * error(mtq.INT8_DEFAULT_CFG)

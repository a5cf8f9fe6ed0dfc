"""GPTQ: error-compensated rounding beats plain rounding and matches the textbook update rule."""

from __future__ import annotations

import torch
from algo_refs import block_max, blockwise_ref, int_quant

from quant_core.algorithms.gptq import gptq_quantize, lower_triangular_inverse
from quant_core.algorithms.weights import BlockFormat


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols // 4, generator=gen, dtype=torch.float64)
    mix = torch.randn(cols // 4, cols, generator=gen, dtype=torch.float64)
    return base @ mix + 0.1 * torch.randn(n, cols, generator=gen, dtype=torch.float64)


def layer_error(x, w, wq):
    return float((x @ (wq - w).T).square().sum())


def obs_reference(w, h, quant, amax_cols, percdamp):
    """Textbook sequential OBS update with an explicitly maintained inverse Hessian (no Cholesky)."""
    w = w.clone()
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = quant(w[:, i], amax_cols[:, i])
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q


def test_gptq_layer_error_below_round_to_nearest():
    x = correlated_inputs(512, 64, seed=0)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fmt = BlockFormat(int_quant(4), block=16)
    rtn = layer_error(x, w, fmt(w))
    for act_order in (False, True):
        wq, _ = gptq_quantize(w, x.T @ x, fmt, block_size=32, act_order=act_order)
        assert layer_error(x, w, wq) < 0.7 * rtn


def test_gptq_output_lies_on_the_grid_of_its_amax():
    x = correlated_inputs(256, 64, seed=2)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fmt = BlockFormat(int_quant(4), block=16)
    for act_order in (False, True):
        wq, amax = gptq_quantize(w, x.T @ x, fmt, block_size=32, act_order=act_order)
        assert amax.shape == (16, 4, 1)
        torch.testing.assert_close(fmt(wq, amax), wq, rtol=0, atol=1e-12)


def test_gptq_matches_textbook_obs_updates():
    x = correlated_inputs(256, 32, seed=4)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = x.T @ x
    fmt = BlockFormat(int_quant(4), block=8)
    amax = fmt.amax(w)
    wq, _ = gptq_quantize(w, h, fmt, amax=amax, block_size=16, percdamp=0.01)
    ref = obs_reference(w, h, fmt.quant, amax.squeeze(-1).repeat_interleave(8, dim=-1), 0.01)
    torch.testing.assert_close(wq, ref, rtol=0, atol=1e-9)


def test_gptq_batched_equals_one_at_a_time():
    xs = [correlated_inputs(128, 32, seed=s) for s in (6, 7)]
    ws = [
        torch.randn(8, 32, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in (8, 9)
    ]
    fmt = BlockFormat(int_quant(4), block=8)
    hs = torch.stack([x.T @ x for x in xs])
    batched, _ = gptq_quantize(torch.stack(ws), hs, fmt, block_size=16, act_order=True)
    for i in range(2):
        single, _ = gptq_quantize(ws[i], hs[i], fmt, block_size=16, act_order=True)
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-12)


def test_gptq_dead_input_channel_keeps_its_rounded_weight():
    # channel 5 is 0 in every calibration token: its weight is rounded to nearest (not zeroed), so
    # when the channel is live at inference GPTQ's output error stays at or below plain rounding's
    data = correlated_inputs(512, 32, seed=10)
    x, live = (
        data[:256].clone(),
        data[256:],
    )  # inference data: the same distribution, channel 5 live
    x[:, 5] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    quant = int_quant(4)
    row_amax = w.abs().amax(1, keepdim=True)
    rtn = quant(w, row_amax)
    wq, _ = gptq_quantize(w, x.T @ x, BlockFormat(quant, block=None), amax=row_amax[:, :, None])
    torch.testing.assert_close(wq[:, 5], rtn[:, 5], rtol=0, atol=1e-12)
    assert layer_error(live, w, wq) <= layer_error(live, w, rtn)


def test_gptq_model_error_below_rtn_and_weights_on_grid():
    import copy

    import quant_core as mtq

    torch.manual_seed(14)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)
    ).eval()
    data = [correlated_inputs(128, 256, seed=s).float() for s in (15, 16)]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])

    def quantized(algorithm):
        m = copy.deepcopy(model)
        config = copy.deepcopy(dict(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG))
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return m, float((torch.cat([m(b) for b in data]) - ref).square().sum())

    _, rtn = quantized("max")
    for options in (
        {"method": "gptq"},
        {"method": "gptq", "act_order": False, "clip_search": False},
    ):
        m, err = quantized(options)
        assert err < rtn, options
        for layer in (m[0], m[2]):
            with torch.no_grad():
                torch.testing.assert_close(
                    layer.weight_quantizer(layer.weight), layer.weight, rtol=0, atol=1e-6
                )


# ----- block sizes that do not divide the input dim: zero-padded, the last block short ----------


def test_gptq_with_short_last_block_on_grid_below_rtn_and_textbook():
    x = correlated_inputs(256, 40, seed=50)
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(51), dtype=torch.float64)
    h = x.T @ x
    fmt = BlockFormat(int_quant(4), block=16)  # blocks of 16, 16 and 8 columns
    rtn = layer_error(x, w, blockwise_ref(w, block_max(w, 16), 16))
    for act_order in (False, True):
        wq, amax = gptq_quantize(w, h, fmt, block_size=24, act_order=act_order)
        assert amax.shape == (16, 3, 1)
        torch.testing.assert_close(wq, blockwise_ref(wq, amax.squeeze(-1), 16), rtol=0, atol=1e-12)
        assert layer_error(x, w, wq) < 0.8 * rtn
    amax = block_max(w, 16)
    wq, _ = gptq_quantize(w, h, fmt, amax=amax.unsqueeze(-1), block_size=24, percdamp=0.01)
    amax_cols = amax.repeat_interleave(16, dim=-1)[:, :40]
    torch.testing.assert_close(
        wq, obs_reference(w, h, fmt.quant, amax_cols, 0.01), rtol=0, atol=1e-9
    )


def test_gptq_on_input_dims_not_multiple_of_block():
    """Linear(576, 64) and Linear(96, 32), INT4 block 128: weights on each short block's grid, error < RTN."""
    import copy

    import quant_core as mtq

    for cin, cout in ((576, 64), (96, 32)):
        torch.manual_seed(52)
        model = torch.nn.Sequential(torch.nn.Linear(cin, cout, bias=False)).eval()
        w0 = model[0].weight.detach().double().clone()
        x = correlated_inputs(256, cin, seed=53)
        config = copy.deepcopy(dict(mtq.INT4_AWQ_CFG))
        config["algorithm"] = "gptq"
        mtq.quantize(model, config, lambda m, x=x: m(x.float()))
        amax = model[0].weight_quantizer.amax.double()
        assert amax.shape == (cout, -(-cin // 128))
        with torch.no_grad():
            wq = model[0].weight_quantizer(model[0].weight).double()
        w = model[0].weight.detach().double()
        torch.testing.assert_close(wq, blockwise_ref(w, amax, 128), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(wq, w, rtol=0, atol=1e-6)  # GPTQ stored on-grid weights
        rtn = layer_error(x, w0, blockwise_ref(w0, block_max(w0, 128), 128))
        assert layer_error(x, w0, wq) < rtn, cin


def test_gptq_int_column_path_equals_the_kernel_quantizer_path():
    """Plain INT formats quantize columns with precomputed scales: same result as qk.fake_quantize."""
    import dataclasses

    from quant_core.algorithms.weights import kernel_format
    from quant_core.config import QuantizerAttributeConfig
    from quant_core.nn.tensor_quantizer import TensorQuantizer

    x = correlated_inputs(256, 40, seed=60).float()
    h = (x.T @ x).expand(3, 40, 40)
    for attrs in (
        {"num_bits": 4, "block_sizes": {-1: 16}},
        {"num_bits": 8, "axis": 0, "narrow_range": True},
        {"num_bits": 4, "block_sizes": {-1: 16}, "unsigned": True},
    ):
        fmt = kernel_format(TensorQuantizer(QuantizerAttributeConfig(**attrs)))
        assert fmt.grid is not None
        generic = dataclasses.replace(fmt, grid=None)
        w = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(61))
        if attrs.get("unsigned"):
            w = w.abs()
        for act_order in (False, True):
            fast, amax = gptq_quantize(w, h, fmt, block_size=8, act_order=act_order)
            slow, amax_slow = gptq_quantize(w, h, generic, block_size=8, act_order=act_order)
            assert torch.equal(fast, slow) and torch.equal(amax, amax_slow), attrs
            assert torch.equal(fmt(fast, amax), fast)  # on the kernel's grid


def test_gptq_and_mse_on_per_tensor_fp8_weights():
    """Per-tensor FP8 weights: one scalar amax, weights on torch's float8_e4m3fn grid, and GPTQ's
    layer output error below round-to-nearest's (FP8_DEFAULT_CFG's weights)."""
    import copy

    import quant_core as mtq

    torch.manual_seed(21)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)).eval()
    data = [correlated_inputs(256, 128, seed=s).float() for s in (22, 23)]
    with torch.no_grad():
        ref = torch.cat([model(b) for b in data])

    def quantized(algorithm):
        m = copy.deepcopy(model)
        config = mtq.FP8_DEFAULT_CFG.copy()
        config["quant_cfg"]["*input_quantizer"] = {"enable": False}
        config["algorithm"] = algorithm
        mtq.quantize(m, config, lambda mm: [mm(b) for b in data])
        with torch.no_grad():
            return m, float((torch.cat([m(b) for b in data]) - ref).square().sum())

    _, rtn = quantized("max")
    for algorithm in ("gptq", "mse"):
        m, err = quantized(algorithm)
        if algorithm == "gptq":
            assert err < rtn
        for layer in (m[0], m[1]):
            amax = layer.weight_quantizer.amax
            assert amax.numel() == 1
            with torch.no_grad():
                wq = layer.weight_quantizer(layer.weight).double()
            scale = amax.double() / 448.0
            on_grid = (wq / scale).to(torch.float8_e4m3fn).double() * scale
            torch.testing.assert_close(on_grid, wq, rtol=1e-6, atol=0)


class _TwoBranches(torch.nn.Module):
    """``unused`` never runs (like an MoE expert that calibration routed no token to)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(128, 32)
        self.unused = torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.used(x)


def test_gptq_skips_modules_the_loop_never_ran_with_a_warning_and_max_weights():
    import warnings

    import quant_core as mtq

    torch.manual_seed(31)
    model = _TwoBranches().eval()
    data = correlated_inputs(256, 128, seed=32).float()
    config = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG.copy()
    config["algorithm"] = "gptq"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mtq.quantize(model, config, lambda m: m(data))
    assert any("unused" in str(w.message) and "never ran" in str(w.message) for w in caught)
    # The unused layer keeps round-to-nearest with amax = max |w| of each 128-block.
    w = model.unused.weight.detach().double()
    expected_amax = block_max(w, 128)
    torch.testing.assert_close(
        model.unused.weight_quantizer.amax.double().reshape(expected_amax.shape), expected_amax
    )
    with torch.no_grad():
        got = model.unused.weight_quantizer(model.unused.weight).double()
    torch.testing.assert_close(got, blockwise_ref(w, expected_amax, 128), rtol=0, atol=1e-6)


def test_lower_triangular_inverse_matches_float64_inverse():
    gen = torch.Generator().manual_seed(30)
    a = torch.randn(3, 300, 300, generator=gen, dtype=torch.float64)
    lower = torch.linalg.cholesky(a @ a.mT + 300 * torch.eye(300, dtype=torch.float64))
    got = lower_triangular_inverse(lower.float(), leaf=64)  # 300 -> 150 -> 75 -> 37/38
    eye = torch.eye(300, dtype=torch.float64).expand_as(lower)
    expected = torch.linalg.solve_triangular(lower, eye, upper=False)  # whole matrix, float64
    assert torch.equal(got.triu(1), torch.zeros_like(got))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_gptq_leaves_torch_thread_settings_alone(monkeypatch):
    """torch 2.13's CPU build breaks batched torch.linalg.inv/solve (MKL ?LASWP errors) for the
    rest of the process once set_num_threads has been called twice, so calibration must not."""
    import quant_core as mtq

    def refuse(_n):
        raise AssertionError("calibration called torch.set_num_threads")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    data = [correlated_inputs(64, 64, seed=s).float() for s in (17, 18)]
    config = {**mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG.copy(), "algorithm": "gptq"}
    mtq.quantize(model, config, lambda m: [m(b) for b in data])
    assert model[0].weight_quantizer.amax is not None

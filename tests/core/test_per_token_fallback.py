"""The ``max`` algorithm's per-token fallback: static per-tensor inputs that outlier tokens defeat
become per-token dynamic; benign ones stay static; the option turns it off; it saves and restores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core.algorithms.per_token_fallback import input_error, sample_inputs


def outlier_rows(scale: float = 100.0, n: int = 256, features: int = 32) -> torch.Tensor:
    """Gaussian tokens, one in 32 scaled by ``scale`` (the shape of GELU / residual-stream outliers)."""
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(0))
    x[::32] *= scale
    return x


def two_layers(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))


def output_error_f64(
    layer: nn.Linear, x: torch.Tensor, num_bits, amax: torch.Tensor | None
) -> float:
    """||(Q(x) - x) W^T||^2 in float64, Q symmetric round-to-nearest: per tensor (``amax``) or per row."""
    x = x.double()
    a = x.abs().amax(-1, keepdim=True) if amax is None else amax.double()
    if num_bits == 8:
        scale = a / 127
        q = torch.clamp(torch.round(x / scale), -128, 127) * scale
    else:  # FP8 E4M3: the value grid of torch.float8_e4m3fn, scaled so amax maps to 448
        scale = a / 448
        q = (x / scale).to(torch.float8_e4m3fn).double() * scale
    return float(((q - x) @ layer.weight.detach().double().T).square().sum())


def signed_constant_rows(n: int = 256, features: int = 32) -> torch.Tensor:
    """Rows ``c_r * (+-1, ...)`` with log-uniform magnitudes ``c_r``: per-token FP8 scaling puts every
    element on the grid (+-448), one per-tensor scale leaves most rows between grid points."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (n, features), generator=gen).float() * 2 - 1
    return signs * torch.exp(torch.rand(n, 1, generator=gen) * 4)


# INT8 loses on outlier tokens (one step for all); FP8's relative grid loses on off-grid row scales
@pytest.mark.parametrize(
    ("cfg", "num_bits", "rows"),
    [
        (mtq.INT8_DEFAULT_CFG, 8, outlier_rows),
        ({**mtq.FP8_DEFAULT_CFG.copy(), "algorithm": "max"}, (4, 3), signed_constant_rows),
    ],
)
def test_defeated_input_switches_to_per_token_and_its_output_error_drops(cfg, num_bits, rows):
    model = two_layers()
    x = rows()
    off = {**cfg, "algorithm": {"method": "max", "per_token_fallback_db": None}}
    static = mtq.quantize(two_layers(), off, lambda m: m(x))
    amax = static[0].input_quantizer.amax
    assert amax == x.abs().max()
    mtq.quantize(model, cfg, lambda m: m(x))
    q = model[0].input_quantizer
    assert q.is_dynamic and q.block_sizes == {-1: None} and q.amax is None
    assert q.num_bits == num_bits  # same element format
    # independent float64 reference: per-token error far below the per-tensor static one
    err_static = output_error_f64(model[0], x, num_bits, amax)
    err_token = output_error_f64(model[0], x, num_bits, None)
    got = ((q(x) - x).double() @ model[0].weight.detach().double().T).square().sum()
    tiny = 1e-6 * err_static  # float32 rounding when the per-token error is ~0
    assert float(got) == pytest.approx(err_token, rel=1e-3, abs=tiny)
    assert err_token * 8 < err_static
    # the recorded measurement agrees with the reference (all 256 rows were sampled)
    assert q.fallback.tokens == 256
    assert q.fallback.static == pytest.approx(err_static, rel=1e-3)
    assert q.fallback.per_token == pytest.approx(err_token, rel=1e-3, abs=tiny)


def test_benign_input_stays_static():
    model = two_layers()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    q = model[0].input_quantizer
    assert not q.is_dynamic and q.amax == x.abs().max()
    assert getattr(q, "fallback", None) is None
    # Gaussian tokens: per-token scaling would gain only a few dB, below the 9 dB default
    assert input_error(model[0], x).gain_db < 9


def test_option_none_keeps_every_input_static_per_tensor():
    x = outlier_rows()
    model = mtq.quantize(two_layers(), with_threshold(None), lambda m: m(x))
    for layer in model:
        assert not layer.input_quantizer.is_dynamic
        assert layer.input_quantizer.amax is not None


def with_threshold(db: float | None) -> dict:
    return {**mtq.INT8_DEFAULT_CFG, "algorithm": {"method": "max", "per_token_fallback_db": db}}


def test_threshold_decides_against_the_measured_gain():
    x = outlier_rows()
    gain = input_error(
        mtq.quantize(two_layers(), with_threshold(None), lambda m: m(x))[0], x
    ).gain_db
    above, below = with_threshold(gain + 1), with_threshold(gain - 1)
    assert not mtq.quantize(two_layers(), above, lambda m: m(x))[0].input_quantizer.is_dynamic
    assert mtq.quantize(two_layers(), below, lambda m: m(x))[0].input_quantizer.is_dynamic


def test_bad_threshold_is_rejected_by_name():
    with pytest.raises(ValueError, match="per_token_fallback_db"):
        mtq.quantize(two_layers(), with_threshold(-1.0), lambda m: m(outlier_rows()))


def test_summary_reports_the_switched_quantizers():
    x = outlier_rows()
    model = mtq.quantize(two_layers(), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    text = mtq.quant_summary(model)
    assert "per-token dynamic (fallback from static" in text
    assert "switched to per-token dynamic by calibration" in text


def test_switched_quantizer_survives_save_and_restore(tmp_path):
    x = outlier_rows()
    model = mtq.quantize(two_layers(), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    assert model[0].input_quantizer.is_dynamic
    mtq.save(model, tmp_path / "m.safetensors")
    restored = mtq.restore(two_layers(seed=5), tmp_path / "m.safetensors")
    for a, b in zip(model, restored):
        assert b.input_quantizer.is_dynamic == a.input_quantizer.is_dynamic
        assert b.input_quantizer.block_sizes == a.input_quantizer.block_sizes
    assert torch.equal(restored(x), model(x))
    again = mtq.restore_quantizer_state(two_layers(seed=5), mtq.quantizer_state(model))
    assert again[0].input_quantizer.is_dynamic and again[0].input_quantizer.amax is None


def _rank_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 sees only large tokens (per-token gains little), rank 1 only small ones (gains a lot)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.randn(128, 32, generator=torch.Generator().manual_seed(rank))
        x = x * 100 if rank == 0 else x
        model = mtq.quantize(two_layers(), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
        alone = input_error(model[0], x).gain_db
        torch.save(
            {"dynamic": model[0].input_quantizer.is_dynamic, "alone": alone}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def test_ranks_decide_alike_from_pooled_errors(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(tmp_path / "r")), nprocs=2)
    results = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    # on its own data rank 1 would switch and rank 0 would not; pooled, neither does
    assert results[1]["alone"] >= 9 > results[0]["alone"]
    assert results[0]["dynamic"] == results[1]["dynamic"] is False


def test_sample_keeps_max_rows_of_the_rows_seen_across_batches():
    layer = nn.Linear(4, 2)
    batches = [
        torch.arange(i * 40, (i + 1) * 40, dtype=torch.float32).repeat(4, 1).T for i in range(3)
    ]
    with sample_inputs({"l": layer}, max_rows=50) as samples:
        for b in batches:
            layer(b.reshape(2, 20, 4))
    kept = samples.rows["l"][:, 0]
    assert samples.rows["l"].shape == (50, 4)
    assert len(set(kept.tolist())) == 50 and set(kept.tolist()) <= set(range(120))
    assert (kept < 40).any() and (kept >= 80).any()  # from the first and the last batch


class _SharedInput(nn.Module):
    """q/k/v-like layers reading one tensor, and a fourth layer reading its own copy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.q, self.k, self.v, self.alone = (nn.Linear(32, 8) for _ in range(4))
        with torch.no_grad():  # give the three shared-input layers different sensitivities
            self.q.weight[:, :16] *= 20.0
            self.v.weight[:, 16:] *= 20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + self.k(x) + self.v(x) + self.alone(x.clone())


def test_layers_reading_one_tensor_are_switched_together_on_their_summed_error():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 32, generator=gen)
    x[::32, :16] *= 60.0  # outlier tokens, large on the channels that q weighs most
    model = _SharedInput()
    layers = [model.q, model.k, model.v]
    static_amax = x.abs().max()
    static = [output_error_f64(m, x, 8, static_amax) for m in layers]
    token = [output_error_f64(m, x, 8, None) for m in layers]
    gains = sorted(10 * math.log10(s / t) for s, t in zip(static, token))
    threshold = gains[1]  # alone, one layer would switch and one would not
    assert gains[0] < threshold <= gains[2]
    group_gain = 10 * math.log10(sum(static) / sum(token))

    cfg = {
        **mtq.INT8_DEFAULT_CFG,
        "algorithm": {"method": "max", "per_token_fallback_db": threshold},
    }
    mtq.quantize(model, cfg, lambda m: m(x))
    decisions = {m.input_quantizer.is_dynamic for m in layers}
    assert decisions == {group_gain >= threshold}  # one decision for the group, from the sums
    alone_gain = 10 * math.log10(
        output_error_f64(model.alone, x, 8, static_amax) / output_error_f64(model.alone, x, 8, None)
    )
    assert model.alone.input_quantizer.is_dynamic == (alone_gain >= threshold)


def test_distributed_sync_false_keeps_the_fallback_on_this_rank(monkeypatch):
    """With ``distributed_sync: False`` a rank calibrating alone must not wait for the others:
    no collective runs, and the decision is this rank's (the outlier input still switches)."""
    import torch.distributed as dist

    def no_collectives(*_args, **_kwargs):
        raise AssertionError("a collective ran although distributed_sync is False")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", no_collectives)
    monkeypatch.setattr(dist, "all_gather", no_collectives)
    model = two_layers()
    x = outlier_rows()
    cfg = {**mtq.INT8_DEFAULT_CFG, "algorithm": {"method": "max", "distributed_sync": False}}
    mtq.quantize(model, cfg, lambda m: m(x))
    assert model[0].input_quantizer.is_dynamic  # switched on this rank's own measurement

"""The ``lsq`` algorithm (ModelOpt 0.47 ``model_calib.lsq``, ``config.LSQConfig``,
``StaticBlockScaleQuantizer.enable_lsq``): gradients against the LSQ paper's step-size formula
(Esser et al. 2019, eq. 3) in float64, training lowers the weight error, save/restore is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quant_core as mtq

INT4_BLOCKS = {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}}
NVFP4_STATIC = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}


def _config(weight: dict, **lsq) -> dict:
    algorithm = {"method": "lsq", "scale_algorithm": {"method": "max"}, **lsq}
    return {
        "quant_cfg": {"*weight_quantizer": weight, "*input_quantizer": {"enable": False}},
        "algorithm": algorithm,
    }


def _layer(seed: int = 0, out_features: int = 32) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, 64, generator=gen) * 0.1)
    return layer, torch.randn(8, 64, generator=gen)


def _paper_step_grad(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """LSQ's d(v_hat * s)/ds at v = w / s: -v + round(v) inside (lo, hi), lo below, hi above."""
    inside = torch.round(v) - v
    return torch.where(v <= lo, lo, torch.where(v >= hi, hi, inside))


def test_tied_step_size_gradient_is_the_lsq_formula() -> None:
    layer, _ = _layer()
    mtq.quantize(layer, _config(INT4_BLOCKS, learnable_amax=["pre", "post"], tied_amax=True), None)
    q = layer.weight_quantizer
    with torch.no_grad():  # some weights beyond the range: they take the lo / hi branch
        q.amax_post.mul_(0.7)
        amax = q.amax_post.detach().double()
    w = layer.weight.detach()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    q(w).backward(upstream)
    v = w.double().reshape(32, 4, 16) / (amax / 7).unsqueeze(-1)  # INT4: qmax 7, lo -8
    assert ((v < -8) | (v > 7)).any()
    expected = (upstream.double().reshape(32, 4, 16) * _paper_step_grad(v, -8, 7)).sum(-1) / 7
    assert torch.allclose(q.amax_post.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_dual_lsq_splits_the_gradient_between_pre_and_post() -> None:
    layer, _ = _layer(1)
    mtq.quantize(layer, _config(INT4_BLOCKS, learnable_amax=["pre", "post"]), None)
    q = layer.weight_quantizer
    with torch.no_grad():
        q.amax_pre.mul_(0.8)
    w = layer.weight.detach()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    q(w).backward(upstream)
    s_pre = (q.amax_pre.detach().double() / 7).unsqueeze(-1)
    s_post = (q.amax_post.detach().double() / 7).unsqueeze(-1)
    v = w.double().reshape(32, 4, 16) / s_pre
    g = upstream.double().reshape(32, 4, 16)
    inside = (v >= -8) & (v <= 7)
    cast = torch.round(v).clamp(-8, 7)
    # y = cast(w / s_pre) * s_post: d/ds_post = cast, d/ds_pre = s_post * (-v / s_pre) inside
    assert torch.allclose(q.amax_post.grad.double(), (g * cast).sum(-1) / 7, rtol=1e-5, atol=1e-5)
    pre = (g * torch.where(inside, -v * s_post / s_pre, 0.0)).sum(-1) / 7
    assert torch.allclose(q.amax_pre.grad.double(), pre, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight", [INT4_BLOCKS, NVFP4_STATIC])
def test_lsq_starts_from_the_calibrated_scales(weight: dict) -> None:
    layer, x = _layer(2)
    reference = copy.deepcopy(layer)
    mtq.quantize(reference, {**_config(weight), "algorithm": "max"}, lambda m: m(x))
    mtq.quantize(layer, _config(weight), lambda m: m(x))  # learnable_amax: ["post"]
    assert [n for n, _ in layer.weight_quantizer.named_parameters()] == ["_amax_post"]
    assert torch.equal(layer(x), reference(x))


def test_nvfp4_post_gradient_is_the_e2m1_codes_through_the_e4m3_scale() -> None:
    from test_four_over_six import _e2m1

    layer, x = _layer(7)
    mtq.quantize(layer, _config(NVFP4_STATIC), lambda m: m(x))
    q, w = layer.weight_quantizer, layer.weight.detach()
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(8))
    q(w).backward(upstream)
    amax = q.amax_pre.detach().double()
    g = amax.max() / (6 * 448)  # the global scale, from the largest calibrated block amax
    scale = (amax / 6 / g).float().to(torch.float8_e4m3fn).double() * g
    codes = _e2m1(w.double().reshape(32, 4, 16) / scale.unsqueeze(-1))
    expected = (upstream.double().reshape(32, 4, 16) * codes).sum(-1) / 6
    assert torch.allclose(q.amax_post.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_training_the_step_sizes_lowers_the_weight_error() -> None:
    layer, x = _layer(2)
    mtq.quantize(layer, _config(INT4_BLOCKS), lambda m: m(x))
    q, w = layer.weight_quantizer, layer.weight.detach()
    start = ((q(w) - w) ** 2).sum().item()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for _ in range(20):
        loss = ((q(w) - w) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ((q(w) - w) ** 2).sum().item() < 0.97 * start


def test_lsq_state_survives_save_and_restore_bit_exactly(tmp_path) -> None:
    layer, x = _layer(3)
    mtq.quantize(layer, _config(NVFP4_STATIC, learnable_amax="pre"), lambda m: m(x))
    with torch.no_grad():
        layer.weight_quantizer.amax_pre.mul_(1.01)
    mtq.save(layer, tmp_path / "lsq.safetensors")
    fresh = mtq.restore(nn.Linear(64, 32), tmp_path / "lsq.safetensors")
    q = fresh.weight_quantizer
    assert q.lsq_state == layer.weight_quantizer.lsq_state
    assert isinstance(q._amax_pre, nn.Parameter) and not isinstance(q._amax_post, nn.Parameter)
    assert torch.equal(q._lsq_global_amax, layer.weight_quantizer._lsq_global_amax)
    assert torch.equal(fresh(x), layer(x))


def test_lsq_config_class_and_refusals() -> None:
    assert mtq.LSQConfig(learnable_amax="post").to_spec() == {
        "method": "lsq",
        "learnable_amax": "post",
    }
    with pytest.raises(ValueError, match="tied_amax"):
        mtq.LSQConfig(tied_amax=True, learnable_amax=["post"])
    layer, x = _layer(4)
    with pytest.warns(mtq.QuantWarning, match="no enabled static block weight quantizer"):
        mtq.quantize(layer, _config({"num_bits": 8, "axis": 0}), lambda m: m(x))
    layer, x = _layer(4)
    mtq.quantize(layer, _config(INT4_BLOCKS), lambda m: m(x))
    with pytest.raises(ValueError, match="lsq"):
        mtq.compress(layer)


def test_lsq_quantizer_describes_its_learned_amax() -> None:
    layer, x = _layer(9)
    mtq.quantize(layer, _config(INT4_BLOCKS, learnable_amax=["pre", "post"]), lambda m: m(x))
    assert "lsq (post+pre) post [" in str(layer.weight_quantizer)

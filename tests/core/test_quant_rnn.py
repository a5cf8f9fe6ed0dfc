"""Quantized RNN / LSTM / GRU (ModelOpt's ``nn/modules/quant_rnn.py`` names and placement of quantizers):
with quantizers off they equal torch's modules; quantized, they equal a float64 reference written
from the cell equations with the INT8 formula at ModelOpt's quantization points."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import quant_core as mtq

OFF = {"quant_cfg": {"*": {"enable": False}}, "algorithm": None}


def _quantized_off(module: nn.Module) -> nn.Module:
    q = copy.deepcopy(module)
    with pytest.warns(RuntimeWarning, match="no quantizer"):  # every quantizer is off
        mtq.quantize(q, OFF)
    return q


def _as_tuple(h):
    return h if isinstance(h, tuple) else (h,)


CASES = [
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"num_layers": 2, "proj_size": 3, "batch_first": True}),
    (nn.GRU, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    (nn.RNN, {"nonlinearity": "relu", "bias": False}),
]


@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_unquantized_rnn_equals_torch(cls: type, kwargs: dict) -> None:
    torch.manual_seed(0)
    ref = cls(input_size=5, hidden_size=7, **kwargs).double()
    q = _quantized_off(ref)
    assert type(q).__name__ == f"Quant{cls.__name__}"
    bf = kwargs.get("batch_first", False)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    x = x if bf else x.transpose(0, 1)
    packed = pack_padded_sequence(x, torch.tensor([4, 6, 2]), batch_first=bf, enforce_sorted=False)
    unbatched = x[0] if bf else x[:, 0]
    for inp in (x, packed, unbatched):
        (o1, h1), (o2, h2) = ref(inp), q(inp)
        o1, o2 = (o1.data, o2.data) if isinstance(o1, nn.utils.rnn.PackedSequence) else (o1, o2)
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-12)
        for a, b in zip(_as_tuple(h1), _as_tuple(h2)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_quantizer_names_follow_modelopt() -> None:
    q = _quantized_off(nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2))
    names = {n for n, m in q.named_modules() if isinstance(m, mtq.TensorQuantizer)}
    assert {
        "weight_ih_l0_weight_quantizer",
        "weight_hh_l1_reverse_weight_quantizer",
        "weight_hr_l0_reverse_weight_quantizer",
        "layer_0_input_quantizer",
        "layer_1_reverse_input_quantizer",
        "proj_1_reverse_input_quantizer",
    } <= names
    assert len(names) == 12 + 4 + 4  # 3 weights x 2 layers x 2 directions, input and proj per cell


def _fq(t: torch.Tensor, amax: float) -> torch.Tensor:
    """INT8 fake quantization in float64 with the float32 scale amax / 127."""
    scale = float(torch.tensor(amax, dtype=torch.float32) / 127)
    return torch.clamp(torch.round(t / scale), -128, 127) * scale


def _reference(mode: str, module: nn.Module, x: torch.Tensor, act_amax: float | None):
    """Single-layer, unidirectional, batch-second reference; weights per-tensor INT8 at max |W|;
    x, h (and c) quantized with ``act_amax`` at every step (None: not quantized)."""
    w = {
        n: _fq(p.detach().double(), float(p.detach().abs().max()))
        if n.startswith("weight")
        else p.detach().double()
        for n, p in module.named_parameters()
    }
    act = (lambda t: _fq(t, act_amax)) if act_amax is not None else (lambda t: t)
    h = torch.zeros(x.shape[1], module.hidden_size, dtype=torch.float64)
    c = torch.zeros_like(h)
    outs, seen = [], [x.abs().max()]
    for t in range(x.shape[0]):
        xt, hq, cq = act(x[t].double()), act(h), act(c)
        gi = xt @ w["weight_ih_l0"].T + w["bias_ih_l0"]
        gh = hq @ w["weight_hh_l0"].T + w["bias_hh_l0"]
        if mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, 1)
            c = torch.sigmoid(f) * cq + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:  # GRU
            ir, iz, in_ = gi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(in_ + r * hn) + z * hq
        outs.append(h)
        seen += [h.abs().max(), c.abs().max()]
    return torch.stack(outs), h, float(max(seen))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_quantized_rnn_matches_float64_reference(cls: type) -> None:
    torch.manual_seed(1)
    module = cls(6, 8)
    x = torch.randn(5, 3, 6)
    cfg = {
        "quant_cfg": {"*weight_quantizer": {"num_bits": 8}, "*input_quantizer": {"num_bits": 8}},
        "algorithm": "max",
    }
    q = copy.deepcopy(module)
    mtq.quantize(q, cfg, lambda m: m(x))
    mode = "LSTM" if cls is nn.LSTM else "GRU"
    # max calibration: statistics of x, h (and c) while activations pass unquantized
    _, _, amax = _reference(mode, module, x, None)
    assert float(q.layer_0_input_quantizer.amax) == pytest.approx(amax, rel=1e-6)
    out, h, _ = _reference(mode, module, x, float(q.layer_0_input_quantizer.amax))
    got, h_n = q(x)
    torch.testing.assert_close(got.double(), out, rtol=0, atol=2e-6)
    torch.testing.assert_close(_as_tuple(h_n)[0][0].double(), h, rtol=0, atol=2e-6)
    before = q(x)[0]
    mtq.fold_weight(q)
    assert not q.weight_ih_l0_weight_quantizer.is_enabled
    torch.testing.assert_close(q(x)[0], before, rtol=0, atol=1e-6)


def test_quantized_lstm_saves_and_restores(tmp_path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.LSTM(6, 8))
    x = torch.randn(5, 2, 6)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    mtq.save(model, tmp_path / "q.pt")
    fresh = mtq.restore(nn.Sequential(nn.LSTM(6, 8)), tmp_path / "q.pt")
    assert type(fresh[0]).__name__ == "QuantLSTM"
    assert torch.equal(fresh(x)[0], model(x)[0])


# ----- VFRNNForward: torch's _VF call forms, with per-layer input quantizers ---------------------
@pytest.mark.parametrize(("cls", "kwargs"), CASES)
def test_vfrnn_forward_with_identity_quantizers_equals_torch(cls: type, kwargs: dict) -> None:
    from quant_core.nn.modules.quant_rnn import VFRNNForward

    torch.manual_seed(0)
    rnn = cls(4, 5, **kwargs)
    dirs = 2 if rnn.bidirectional else 1
    vf = VFRNNForward(
        rnn.mode if cls is not nn.RNN else f"RNN_{rnn.nonlinearity.upper()}",
        rnn.bidirectional,
        rnn.num_layers,
        rnn.proj_size > 0,
        rnn.bias,
        [lambda x: x] * (rnn.num_layers * dirs),
        batch_first=rnn.batch_first,
    )
    x = torch.randn(3, 6, 4)
    h_size = rnn.proj_size or 5
    h0 = torch.randn(rnn.num_layers * dirs, 3 if rnn.batch_first else 6, h_size)
    hidden = (h0, torch.randn(*h0.shape[:2], 5)) if cls is nn.LSTM else h0
    ref = rnn(x, hidden)
    args = (x, hidden, rnn._flat_weights, rnn.bias, rnn.num_layers, 0.0, False)
    got = vf(*args, rnn.bidirectional, rnn.batch_first)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1:], _as_tuple(ref[1])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vfrnn_forward_quantizes_each_step_input_and_hidden_state() -> None:
    from quant_core.nn.modules.quant_rnn import VFRNNForward

    torch.manual_seed(0)
    rnn = nn.GRU(4, 5)
    seen = []

    def quantizer(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape)
        return torch.round(x * 4) / 4

    vf = VFRNNForward("GRU", False, 1, False, True, [quantizer])
    x, h0 = torch.randn(3, 2, 4), torch.zeros(1, 2, 5)
    out, h_n = vf(x, h0, rnn._flat_weights, True, 1, 0.0, False, False, False)
    assert out.shape == (3, 2, 5)
    # float64 reference: torch's GRU cell on the rounded step input and rounded hidden state
    w = [p.double() for p in rnn._flat_weights]
    h = h0[0].double()
    for t in range(3):
        h = torch.gru_cell(torch.round(x[t].double() * 4) / 4, torch.round(h * 4) / 4, *w)
    torch.testing.assert_close(h_n[0].double(), h, atol=1e-5, rtol=1e-5)
    assert len(seen) == 6  # input and hidden state of each of the 3 steps
    with pytest.raises(ValueError, match="one input quantizer per layer"):
        VFRNNForward("GRU", True, 1, False, True, [quantizer])


def test_rnn_quantizer_switch_helpers() -> None:
    rnn = mtq.nn.QuantModuleRegistry.convert(nn.LSTM(4, 5, num_layers=2, proj_size=3))
    rnn._disable_input_quantizers()
    names = [n for n, m in rnn.named_children() if n.endswith("input_quantizer")]
    assert len(names) == 4 and not any(getattr(rnn, n).is_enabled for n in names)
    rnn._disable_weight_quantizers()
    assert not rnn.weight_ih_l0_weight_quantizer.is_enabled
    rnn._enable_weight_quantizers()
    assert rnn.weight_hr_l1_weight_quantizer.is_enabled

"""Quantizer attributes ModelOpt 0.47 accepts (``config.py`` ``QuantizerAttributeConfig``,
``nn/modules/tensor_quantizer.py``): wide integer ``num_bits``, ``block_sizes`` winning over ``axis``,
``calibrator=(cls, args, kwargs)``, ``constant_amax``, ``rotate``, ``backend``; and ModelOpt's
``enable_stats_collection`` / ``finish_stats_collection``. References are float64 formulas and
``scipy.linalg.hadamard``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import quant_core as mtq
from quant_core.calib import _Calibrator
from quant_core.model_calib import enable_stats_collection, finish_stats_collection
from quant_core.nn import TensorQuantizer
from quant_core.nn.rotation import normalized_hadamard_transform


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int_reference(x: torch.Tensor, amax: float, bits: int, unsigned: bool = False) -> torch.Tensor:
    """Integer fake quantization: float32 scale amax / qmax, round half to even, clamp (float64 after)."""
    qmax = 2 ** (bits - (0 if unsigned else 1)) - 1
    scale = torch.tensor(amax, dtype=torch.float32) / qmax  # float32, as the documented scale
    q = torch.round(x.double() / scale.double())
    q = q.clamp(0 if unsigned else -qmax - 1, qmax)
    return (q * scale.double()).float()


@pytest.mark.parametrize(("bits", "unsigned"), [(16, False), (12, False), (16, True), (10, True)])
def test_integer_num_bits_above_8_quantize_on_the_wide_grid(bits: int, unsigned: bool) -> None:
    x = torch.randn(8, 64, generator=_gen())
    x = x.abs() if unsigned else x
    amax = 2.5
    q = TensorQuantizer({"num_bits": bits, "unsigned": unsigned}, amax=amax)
    ref = _int_reference(x, amax, bits, unsigned)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-7)
    codes = mtq.tensor_quant.qk.quantize_to_codes(x, num_bits=bits, amax=amax, unsigned=unsigned)
    assert codes.codes.dtype == (torch.int32 if unsigned and bits == 16 else torch.int16)
    assert torch.equal(codes.dequantize(), q(x))


def test_sixteen_bit_linear_stays_close_to_float() -> None:
    """ModelOpt's test_quant_linear: QuantLinear with 16-bit descriptors is a bounded error off nn.Linear."""
    torch.manual_seed(0)
    layer = mtq.nn.QuantLinear(
        3,
        5,
        quant_desc_input=mtq.QuantizerAttributeConfig(num_bits=16),
        quant_desc_weight=mtq.QuantizerAttributeConfig(num_bits=16, axis=0),
    )
    x = torch.randn(2, 3)
    plain = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    with pytest.warns(RuntimeWarning, match="never calibrated"):  # uses each input's amax
        out = layer(x)
    assert (out.double() - plain).abs().max() < 1e-3


@pytest.mark.parametrize("bad", [17, 0, 1, -3])
def test_integer_num_bits_outside_2_to_16_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=r"num_bits"):
        mtq.QuantizerAttributeConfig(num_bits=bad)


def test_block_sizes_win_over_axis_on_update_but_not_in_one_config() -> None:
    q = TensorQuantizer({"num_bits": 8, "axis": 0})
    q.set_from_attribute_config({"block_sizes": {-1: 4}})
    assert q.axis is None and q.block_sizes == {-1: 4}
    with pytest.raises(ValueError, match="axis"):
        mtq.QuantizerAttributeConfig(num_bits=8, axis=0, block_sizes={-1: 128})


def test_block_sizes_of_whole_axes_equal_per_channel() -> None:
    """ModelOpt's test_block_sizes_axis: ``{1: None}`` on a 2-D weight is per row (axis 0)."""
    w = torch.randn(3, 3, generator=_gen(1))
    blocks = TensorQuantizer({"num_bits": 8, "block_sizes": {1: None}})
    per_row = TensorQuantizer({"num_bits": 8, "axis": 0})
    with pytest.warns(RuntimeWarning):  # uncalibrated: both use the amax of w
        torch.testing.assert_close(blocks(w), per_row(w), rtol=0, atol=0)
    amax = w.double().abs().amax(1, keepdim=True)
    torch.testing.assert_close(per_row(w), _int_reference_rows(w, amax), rtol=0, atol=1e-7)


def _int_reference_rows(w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = amax.float() / 127
    q = torch.round(w.double() / scale.double()).clamp(-128, 127)
    return (q * scale.double()).float()


class _MeanAbsMax(_Calibrator):
    """A user calibrator: amax = the mean over batches of max |x| times ``factor``."""

    def __init__(self, num_bits, axis, unsigned, factor: float = 1.0):
        super().__init__(num_bits, axis, unsigned)
        self.factor, self.maxima = factor, []

    def collect(self, x):
        self.maxima.append(float(x.abs().max()))

    def compute_amax(self):
        return torch.tensor(self.factor * np.mean(self.maxima)) if self.maxima else None

    def reset(self):
        self.maxima = []


def test_calibrator_constructor_is_built_and_used() -> None:
    batches = [torch.randn(4, 8, generator=_gen(i)) * (i + 1) for i in range(3)]
    cfg = {"num_bits": 8, "calibrator": (_MeanAbsMax, (8, None, False), {"factor": 0.5})}
    q = TensorQuantizer(cfg, if_calib=True, if_quant=False)
    assert isinstance(q.calibrator, _MeanAbsMax) and q.calibrator.factor == 0.5
    for b in batches:
        q(b)
    q.load_calib_amax()
    expected = 0.5 * np.mean([float(b.abs().max()) for b in batches])
    assert float(q.amax) == pytest.approx(expected, rel=1e-6)
    # checkpoints hold no code: the attribute is written as "max"
    assert q.attribute_config.to_json_dict()["calibrator"] == "max"
    with pytest.raises(ValueError, match="calibrator"):
        mtq.QuantizerAttributeConfig(calibrator=("not callable", (), {}))


def test_constant_amax_pins_amax_through_calibration() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 8, "axis": 0},
            "*input_quantizer": {"num_bits": 8, "constant_amax": 0.5},
        },
        "algorithm": "max",
    }
    x = torch.randn(4, 16, generator=_gen(2)) * 3
    mtq.quantize(model, cfg, lambda m: m(x))
    iq = model[0].input_quantizer
    assert float(iq.amax) == 0.5
    torch.testing.assert_close(iq(x), _int_reference(x, 0.5, 8), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="constant_amax"):
        mtq.QuantizerAttributeConfig(num_bits=8, constant_amax=0.0)
    with pytest.raises(ValueError, match="mutually exclusive"):
        mtq.QuantizerAttributeConfig(num_bits=8, constant_amax=1.0, use_constant_amax=True)


def test_constant_amax_2688_gives_nvfp4_global_scale_one() -> None:
    """ModelOpt: for NVFP4 activations constant_amax = 6 * 448 makes the exported input_scale 1.0."""
    q = TensorQuantizer(
        {
            "num_bits": (2, 1),
            "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
            "constant_amax": 2688.0,
        }
    )
    assert float(q.format.global_amax(q.amax)) / (6 * 448) == 1.0
    assert float(TensorQuantizer({"num_bits": (4, 3), "use_constant_amax": True}).amax) == 448.0


def _hadamard(n: int) -> torch.Tensor:
    return torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / n**0.5


@pytest.mark.parametrize(("dim", "block"), [(64, None), (48, None), (32, 8)])
def test_hadamard_transform_matches_scipy(dim: int, block: int | None) -> None:
    x = torch.randn(5, dim, dtype=torch.float64, generator=_gen(3))
    size = block or (dim & -dim)
    ref = (x.reshape(5, dim // size, size) @ _hadamard(size).T).reshape(5, dim)
    torch.testing.assert_close(
        normalized_hadamard_transform(x, block_size=block), ref, rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="power-of-2"):
        normalized_hadamard_transform(torch.randn(2, 7))


def test_rotated_quantizer_quantizes_the_rotated_input() -> None:
    x = torch.randn(6, 32, generator=_gen(4))
    h = _hadamard(32)
    rotated = (x.double() @ h.T).float()
    q = TensorQuantizer({"num_bits": 8, "rotate": True}, amax=2.0)
    torch.testing.assert_close(q(x), _int_reference(rotated, 2.0, 8), rtol=0, atol=1e-6)
    back = TensorQuantizer(
        {"num_bits": 8, "rotate": {"enable": True, "mode": "rotate_back"}}, amax=2.0
    )
    expected = (_int_reference(rotated, 2.0, 8).double() @ h).float()  # H is its own inverse
    torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-5)
    q.set_from_attribute_config({"enable": False})  # as ModelOpt: also turns rotation off
    assert not q.rotate_is_enabled and torch.equal(q(x), x)


def test_rotating_both_operands_keeps_the_product_and_folds() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    x = torch.randn(4, 32)
    plain = layer(x).double()
    qlayer = mtq.nn.QuantLinear(32, 8)
    qlayer.load_state_dict(layer.state_dict(), strict=False)
    for q in (qlayer.input_quantizer, qlayer.weight_quantizer):
        q.set_from_attribute_config({"rotate": True})
        q.disable()  # disabled quantizers still rotate, so the pair stays consistent
    torch.testing.assert_close(qlayer(x).double(), plain, rtol=0, atol=1e-5)
    qlayer.weight_quantizer.enable()
    mtq.calibrate(qlayer, "max")
    before = qlayer(x)
    qlayer.fold_weight()
    assert not qlayer.weight_quantizer.rotate_is_enabled
    torch.testing.assert_close(qlayer(x), before, rtol=0, atol=1e-6)


def test_rotated_or_custom_backend_quantizers_are_not_compressed() -> None:
    model = nn.Sequential(nn.Linear(32, 16))
    cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0, "rotate": True}}}
    mtq.quantize(model, {**cfg, "algorithm": "max"})
    with pytest.raises(ValueError, match="rotate"):
        mtq.compress(model)


def test_custom_backend_replaces_fake_quantization() -> None:
    calls = []

    def round_to_tenths(x: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
        calls.append(quantizer.backend_extra_args)
        return torch.round(x * 10) / 10

    mtq.nn.register_quant_backend("tenths", round_to_tenths)
    try:
        assert mtq.nn.is_registered_quant_backend("tenths")
        q = TensorQuantizer(
            {"num_bits": "tenths-grid", "backend": "tenths", "backend_extra_args": {"k": 1}},
            amax=1.0,
        )
        x = torch.tensor([0.123, -0.456, 2.0])
        torch.testing.assert_close(q(x), torch.tensor([0.1, -0.5, 2.0]))
        assert calls == [{"k": 1}]
        with pytest.warns(UserWarning, match="overwriting"):
            mtq.nn.register_quant_backend("tenths", round_to_tenths)
    finally:
        mtq.nn.unregister_quant_backend("tenths")
    with pytest.raises(KeyError, match="tenths"):
        q(x)
    with pytest.raises(ValueError, match="backend"):
        mtq.QuantizerAttributeConfig(num_bits="tenths-grid")


def test_manual_stats_collection_loads_max_and_keeps_constants() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 8, "axis": 0},
            "*input_quantizer": {"num_bits": 8},
            "2.input_quantizer": {"num_bits": 8, "constant_amax": 3.0},
        },
        "algorithm": None,
    }
    mtq.quantize(model, cfg)
    batches = [torch.randn(5, 8, generator=_gen(i)) for i in range(3)]
    enable_stats_collection(model)
    for b in batches:
        model(b)  # unquantized while collecting
    finish_stats_collection(model)
    first = model[0].input_quantizer
    assert float(first.amax) == max(float(b.abs().max()) for b in batches)
    w_amax = model[0].weight.detach().abs().amax(1, keepdim=True)
    torch.testing.assert_close(model[0].weight_quantizer.amax, w_amax)
    assert float(model[2].input_quantizer.amax) == 3.0
    assert first._if_quant and not first._if_calib


def test_finish_stats_collection_passes_the_method_to_histograms() -> None:
    q = TensorQuantizer({"num_bits": 8, "calibrator": "histogram"})
    model = nn.ModuleDict({"q": q})
    x = torch.randn(20000, generator=_gen(5))
    enable_stats_collection(model)
    q(x)
    finish_stats_collection(model, method="percentile", percentile=99.0)
    assert float(q.amax) == pytest.approx(float(np.percentile(x.abs().numpy(), 99.0)), rel=2e-3)

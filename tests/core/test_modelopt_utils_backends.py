"""ModelOpt's ``quantization.utils`` package (``core_utils``, ``numeric_utils``, ``calib_utils``),
``model_calib.svd`` and the ``backends`` real-quant GEMM registry, written from their documented
behaviour; numerics against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_core import backends, model_calib
from quant_core.utils import calib_utils, core_utils, numeric_utils, reduce_block_amax


# ----- utils.core_utils ------------------------------------------------------------------------
def test_reduce_block_amax_is_the_max_magnitude_of_each_tile() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 12)
    got = reduce_block_amax(x, {-1: 4, -2: 2, "type": "static"})
    ref = x.double().abs().reshape(4, 2, 3, 4).amax(dim=(1, 3))
    assert got.shape == (4, 3)
    torch.testing.assert_close(got.double(), ref)
    with pytest.raises(ValueError, match="not divisible"):
        reduce_block_amax(x, {-1: 5})


def test_existing_utils_names_stay_importable_from_the_package() -> None:
    from quant_core.utils import is_quantized, reduce_amax

    assert reduce_amax is core_utils.reduce_amax and callable(is_quantized)


def test_param_index_names_modules_by_their_first_parameter() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    index = core_utils.build_param_index(model)
    assert index[id(model[1][0].bias)] == (3, "1.0.bias")
    assert core_utils.get_prefixed_param_names(model, model[1][0], index) == "1.0"
    assert core_utils.get_prefixed_param_names(model, model[1][1]) is None
    assert core_utils.get_prefixed_param_names(model, nn.Linear(2, 2), index) is None

    class Info:
        def __init__(self, module: nn.Module, name: str) -> None:
            self._module_info = type("I", (), {"module": module, "param_name": name})()

    mapping = core_utils.create_fsdp_param_mapping([Info(model[1][0], "weight")], model)
    assert list(mapping) == ["1.0.weight"]


# ----- utils.numeric_utils ---------------------------------------------------------------------
def test_mxfp4_to_nvfp4_global_amax_puts_the_largest_exponent_at_the_e4m3_top() -> None:
    e8m0 = torch.tensor([0, 127 + 3, 127 - 2, 127 - 20], dtype=torch.uint8)
    amax, info = numeric_utils.mxfp4_to_nvfp4_global_amax(e8m0)
    assert amax == 6 * 448 * 2.0 ** (3 - 8)
    assert (info["k_min"], info["k_max"], info["n_zero_blocks"]) == (-20, 3, 1)
    assert info["n_lossless_blocks"] == 3  # the k=-20 block is 23 below k_max: out of range


def test_mxfp4_to_nvfp4_per_block_amax_reencodes_mxfp4_codes_exactly() -> None:
    torch.manual_seed(0)
    k = torch.tensor([2, -1, -3, 0], dtype=torch.int32)
    e8m0 = (k + 127).to(torch.uint8)
    blocks = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    amax = numeric_utils.mxfp4_to_nvfp4_per_block_amax(blocks, e8m0)
    assert amax.shape == (8,)
    global_amax, _ = numeric_utils.mxfp4_to_nvfp4_global_amax(e8m0)
    # Float64 check of the lossless claim: NVFP4 block scale = (amax / 6) / (global / (6*448))
    # must be a power of two exactly representable in E4M3 and equal to 2^k / 2^m.
    scale = (amax.double() / 6) / (global_amax / (6 * 448))
    expected = torch.exp2((k - (2 - 8)).double()).repeat_interleave(2)
    torch.testing.assert_close(scale, expected)
    assert torch.equal(scale.float().to(torch.float8_e4m3fn).double(), scale)
    with pytest.raises(ValueError, match="shape mismatch"):
        numeric_utils.mxfp4_to_nvfp4_per_block_amax(blocks[:3], e8m0)


def test_per_block_amax_out_of_range_blocks_use_their_largest_code() -> None:
    e8m0 = torch.tensor([127 + 10, 127 - 10], dtype=torch.uint8)
    blocks = torch.zeros(2, 16, dtype=torch.uint8)
    blocks[1, 5] = 0x4C  # codes 0xC (-2.0) and 0x4 (2.0): largest magnitude 2
    amax = numeric_utils.mxfp4_to_nvfp4_per_block_amax(blocks, e8m0)
    assert amax.tolist() == [6 * 2.0**10] * 2 + [2 * 2.0**-10] * 2


# ----- utils.calib_utils -----------------------------------------------------------------------
def test_update_hessian_is_the_running_mean_of_2_x_xT() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 4), torch.randn(2, 4), torch.randn(0, 4)]
    hessian, n = torch.zeros(4, 4), 0
    for b in batches:
        hessian, n = calib_utils.update_hessian(b, hessian, n)
    x = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    assert n == 17
    torch.testing.assert_close(hessian.double(), 2 * x.t() @ x / 17, rtol=1e-5, atol=1e-6)


# ----- model_calib.svd -------------------------------------------------------------------------
def test_svd_gives_the_best_low_rank_factors_and_pads_beyond_the_rank() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    us, vt = model_calib.svd(w, 5)
    torch.testing.assert_close(us @ vt, w, atol=1e-5, rtol=1e-5)
    us, vt = model_calib.svd(w, 2)
    u, s, v = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close((us @ vt).double(), (u[:, :2] * s[:2]) @ v[:2], atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="padded with zeros"):
        us, vt = model_calib.svd(w, 8)
    assert us.shape == (6, 8) and vt.shape == (8, 5) and not us[:, 5:].any()


# ----- backends.gemm_registry ------------------------------------------------------------------
def _int8_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, lambda m: m(torch.randn(8, 4)))
    return model


def test_marked_layers_run_the_first_matching_registered_gemm() -> None:
    model = _int8_model()
    x = torch.randn(2, 4)
    fake = model(x)
    calls = []

    def gemm(module, input, weight, bias):
        calls.append(module)
        return torch.nn.functional.linear(input, weight, bias) * 0 + 7

    backends.gemm_registry.register(gemm, lambda m, i, a, k: isinstance(m, nn.Linear))
    try:
        assert gemm in backends.gemm_registry
        backends.enable_real_quant_gemm(model)
        assert backends.is_real_quant_gemm_enabled(model)
        assert torch.equal(model(x), torch.full((2, 3), 7.0)) and calls == [model[0]]
        backends.disable_real_quant_gemm(model)
        torch.testing.assert_close(model(x), fake)
    finally:
        backends.gemm_registry.unregister(gemm)
    assert gemm not in backends.gemm_registry


def test_without_a_matching_gemm_the_layer_warns_and_fake_quantizes() -> None:
    model = _int8_model()
    x = torch.randn(2, 4)
    fake = model(x)
    backends.enable_real_quant_gemm(model)
    with pytest.warns(UserWarning, match="no registered real-quant GEMM"):
        out = model(x)
    torch.testing.assert_close(out, fake)


# ----- utils.layerwise_calib.LayerActivationCollector and model_calib.layerwise_calibrate ------
class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Scale(2.0), _Scale(0.5), _Scale(3.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_collector_gives_each_layer_the_inputs_of_a_plain_forward(monkeypatch) -> None:
    from quant_core.utils.layerwise_calib import LayerActivationCollector

    monkeypatch.setattr(LayerActivationCollector, "_decoder_layer_support", [])
    LayerActivationCollector.register_decoder_layer_support(
        lambda m: hasattr(m, "layers"), lambda m: m.layers
    )
    model = _Stack()
    assert LayerActivationCollector.get_decoder_layers(model) is model.layers
    assert not LayerActivationCollector.is_supported(nn.Linear(2, 2))
    batches = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])]
    collector = LayerActivationCollector(model)
    collector._patch_all_layers()
    try:
        got = [
            collector.get_input_activations(layer, lambda m: [m(b) for b in batches])
            for layer in model.layers
        ]
    finally:
        collector._unpatch_all_layers()
    scale = [1.0, 2.0, 1.0]  # the product of the scales before each layer
    for i, per_batch in enumerate(got):
        for (args, kwargs), b in zip(per_batch, batches):
            assert torch.equal(args[0], b * scale[i]) and kwargs == {}
    assert "forward" not in vars(model.layers[0])  # unpatched


def test_layerwise_calibrate_runs_the_calib_func_per_layer_on_its_inputs() -> None:
    model = _Stack()
    seen: list[tuple[nn.Module, list[torch.Tensor]]] = []

    def calib_func(layer: nn.Module, loop, **kwargs) -> None:
        assert kwargs == {"option": 1}
        inputs: list[torch.Tensor] = []
        handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        loop(layer)
        handle.remove()
        seen.append((layer, inputs))

    x = torch.tensor([1.0, 2.0])
    model_calib.layerwise_calibrate(model, lambda m: m(x), calib_func, option=1)
    assert [layer for layer, _ in seen] == list(model.layers)
    assert [inputs[0].tolist() for _, inputs in seen] == [[1.0, 2.0], [2.0, 4.0], [1.0, 2.0]]
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model_calib.layerwise_calibrate(model, lambda m: m(x), calib_func, checkpoint_dir="/x")

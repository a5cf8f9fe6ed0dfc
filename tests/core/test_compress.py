"""mtq.compress: packed codes + scales whose forward equals the fake-quant forward (float64 reference)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq
from quant_core.compress import CompressedLinear

# (config, expected backend on CPU, relative tolerance of |y - ref| against (|x| @ |W|^T))
# Float32 accumulation over K=320 inputs: error <= K * 2**-24 * (|x| @ |W|^T) ~ 1.9e-5; 2e-5 bounds it.
# K=320 is 2.5 blocks of 128: INT4's partial last block is padded for the int4pack kernel.
FORMATS = {
    "INT8": ("INT8_DEFAULT_CFG", "dequant", 2e-5),
    "INT4_BLOCK": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4pack_cpu", 2e-5),
    "FP8": ("FP8_DEFAULT_CFG", "dequant", 2e-5),
    "NVFP4": ("NVFP4_DEFAULT_CFG", "dequant", 2e-5),
    "MXFP8": ("MXFP8_DEFAULT_CFG", "dequant", 2e-5),
    "MXFP4": ("MXFP4_DEFAULT_CFG", "dequant", 2e-5),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(320, 64), nn.GELU(), nn.Linear(64, 32))


def _quantized(cfg_name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    model = _model(seed)
    x = torch.randn(4, 7, 320)
    mtq.quantize(model, getattr(mtq, cfg_name), forward_loop=lambda m: m(x))
    return model, x


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_compressed_forward_matches_float64_fake_quant(fmt: str) -> None:
    cfg, backend, rtol = FORMATS[fmt]
    model, x = _quantized(cfg)
    first = model[0]
    with torch.no_grad():
        xq = first.input_quantizer(x)
        wq = first.weight_quantizer(first.weight)
        ref = F.linear(xq.double(), wq.double(), first.bias.double())
        bound = xq.double().abs() @ wq.double().abs().t()
        fake_out = model(x)
    mtq.compress(model)
    layer = model[0]
    assert isinstance(layer, CompressedLinear) and layer.backend.name == backend
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 for p in layer.parameters())
    with torch.no_grad():
        y = layer(x)
        out = model(x)
    assert (y.double() - ref).abs().le(rtol * bound + 1e-6).all()
    with torch.no_grad():  # two rows: the int4pack kernel path (28 rows dequantize)
        y_small = layer(x[0, :2])
    assert (y_small.double() - ref[0, :2]).abs().le(rtol * bound[0, :2] + 1e-6).all()
    torch.testing.assert_close(out, fake_out, rtol=1e-4, atol=1e-4)


def test_int4_bf16_activations_match_fake_quant() -> None:
    model, x = _quantized("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    wq = model[0].weight_quantizer(model[0].weight).detach()
    ref = F.linear(x.bfloat16().double(), wq.double(), model[0].bias.double())
    mtq.compress(model)
    y = model[0].to(torch.bfloat16)(x.bfloat16())
    # bf16 output rounding (2**-8 relative) on top of the bf16 scales' rounding
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_resident_bytes_shrink() -> None:
    model, _ = _quantized("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    mtq.compress(model)
    packed = sum(b.numel() * b.element_size() for b in model[0].buffers(recurse=False))
    # 64 rows of 320 inputs padded to 3 blocks of 128: 4-bit codes, one fp32 (scale, zero) per block
    assert packed == 64 * 384 // 2 + 64 * 3 * 2 * 4  # 0.17x the 81,920 fp32 bytes


def test_refuses_uncalibrated_and_dynamic_weights() -> None:
    model, _ = _quantized("INT8_DEFAULT_CFG")
    model[0].weight_quantizer.reset_amax()
    with pytest.raises(ValueError, match=r"layer 0: weight quantizer is not calibrated"):
        mtq.compress(model)
    model = _model()
    cfg = {
        "quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0, "type": "dynamic"}},
        "algorithm": "max",
    }
    mtq.quantize(model, cfg, forward_loop=lambda m: m(torch.randn(2, 320)))
    with pytest.raises(ValueError, match=r"layer 0: dynamic per-tensor/per-channel weight"):
        mtq.compress(model)


@pytest.mark.parametrize("fmt", ["INT4_BLOCK", "NVFP4"])
def test_state_dict_round_trip(fmt: str) -> None:
    """A compressed model's state_dict restores into another compressed model of the same shape."""
    cfg = FORMATS[fmt][0]
    source, x = _quantized(cfg, seed=0)
    mtq.compress(source)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    target, _ = _quantized(cfg, seed=1)
    mtq.compress(target)
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
        target.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_summary_shows_backend() -> None:
    model, _ = _quantized("INT4_BLOCKWISE_WEIGHT_ONLY_CFG")
    mtq.compress(model)
    text = mtq.quant_summary(model)
    assert "int4pack_cpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,backend", [("FP8", "scaled_mm_cuda"), ("INT4_BLOCK", "int4pack_cuda")]
)
def test_cuda_backends_match_fake_quant(fmt: str, backend: str) -> None:
    cfg = FORMATS[fmt][0]
    model, x = _quantized(cfg)
    model, x = model.cuda(), x.cuda()
    with torch.no_grad():
        fake = model(x)
    mtq.compress(model)
    assert model[0].backend.name == backend
    with torch.no_grad():
        out = model(x)
    # bf16 kernel output: 2**-8 relative rounding
    torch.testing.assert_close(out.float(), fake, rtol=2e-2, atol=2e-2 * fake.abs().max().item())


@pytest.mark.parametrize("n", [16, 48, 64, 80, 192])
def test_int4pack_cpu_unpack_matches_the_kernel(n: int) -> None:
    """The layout reader recovers the codes the kernel multiplies: kernel(I) is the dequantized W^T."""
    from quant_core.compress.backends import unpack_int4pack_cpu

    k, block = 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(unpack_int4pack_cpu(packed, n, k).to(torch.int32), q)
    scale = torch.ones(k // block, n, 2)
    scale[..., 1] = 0
    w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, block, scale)
    assert torch.equal(w_t, (q - 8).float().t())


@pytest.mark.parametrize("fmt", ["INT4_BLOCK", "NVFP4", "FP8"])
def test_save_restore_compressed_model(fmt: str, tmp_path) -> None:
    """mtq.save writes the packed codes; mtq.restore rebuilds the compressed layers from a fresh model."""
    source, x = _quantized(FORMATS[fmt][0], seed=0)
    mtq.compress(source)
    path = tmp_path / "model.safetensors"
    mtq.save(source, path)
    target = mtq.restore(_model(seed=1), path)
    layer = target[0]
    assert isinstance(layer, CompressedLinear) and layer.backend.name == FORMATS[fmt][1]
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 for p in layer.parameters())
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_restoring_a_compressed_layer_into_another_input_size_is_refused_before_any_change(
    tmp_path,
) -> None:
    """Packed INT4 rows of 64 inputs fit the buffers of 128 after padding: the saved weight shape
    is what tells them apart, checked before the model is converted."""
    source, _ = _quantized(FORMATS["INT4_BLOCK"][0], seed=0)
    mtq.compress(source)
    path = tmp_path / "model.safetensors"
    mtq.save(source, path)
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(320, 64), nn.GELU(), nn.Linear(128, 32))
    with pytest.raises(ValueError, match=r"saved compressed with a \(32, 64\) weight.*\(32, 128\)"):
        mtq.restore(target, path)
    assert type(target[0]) is nn.Linear and type(target[2]) is nn.Linear  # left as it was


def test_compressing_4_bit_codes_of_an_odd_input_size_is_refused_by_layer_name() -> None:
    model = nn.Sequential(nn.Linear(33, 16))
    x = torch.randn(4, 33)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(x))
    with pytest.raises(ValueError, match=r"layer 0: e2m1 codes are packed two per byte.*got 33"):
        mtq.compress(model)
    assert not isinstance(model[0], CompressedLinear)


def test_half_after_compress_keeps_the_fp8_codes_and_casts_the_rest() -> None:
    model, x = _quantized(FORMATS["FP8"][0])
    mtq.compress(model)
    with torch.no_grad():
        before = model(x)
    model.half()
    assert model[0].codes.dtype == torch.float8_e4m3fn and model[0].scale.dtype == torch.float16
    with torch.no_grad():
        after = model(x.half()).float()
    # fp16 activations and scales: a few FP8 input roundings flip (one step is 2**-3 relative)
    assert (after - before).abs().max() <= 5e-2 * before.abs().max()

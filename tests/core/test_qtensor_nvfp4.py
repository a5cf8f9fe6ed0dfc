"""ModelOpt's ``qtensor.NVFP4QTensor`` and ``NVFP4StaticQuantizer`` (``qtensor/nvfp4_tensor.py``,
``nn/modules/tensor_quantizer.py``), against an independent NVFP4 reference: torch's float8_e4m3fn
cast for the block scales and nearest-even rounding onto the E2M1 grid in float64."""

from __future__ import annotations

import pytest
import torch

import quant_core as mtq
from quant_core.nn import NVFP4StaticQuantizer
from quant_core.qtensor import NVFP4QTensor

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _reference(x: torch.Tensor, block: int = 16):
    """(dequantized values, E2M1 codes, E4M3 block scales, per-tensor scale) from the NVFP4 rules."""
    scale_2 = x.abs().max().float() / (6 * 448)
    blocks = x.float().reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1)
    scale_e4m3 = (amax / 6 / scale_2).clamp(max=448).to(torch.float8_e4m3fn)
    scale = scale_e4m3.float() * scale_2
    v = (blocks / scale.unsqueeze(-1)).double().clamp(-6, 6)
    dist = (v.abs().unsqueeze(-1) - E2M1).abs()
    best = dist.min(-1, keepdim=True).values
    ties = dist == best  # on a tie take the even code (E2M1 codes alternate even/odd mantissa)
    idx = torch.where(ties & (torch.arange(8) % 2 == 0), torch.arange(8), 99).amin(-1)
    idx = torch.where(ties.sum(-1) > 1, idx, dist.argmin(-1))
    codes = (
        idx + 8 * (v < 0).long()
    )  # negative values rounding to 0 keep the sign (-0), as ModelOpt
    values = torch.sign(v) * E2M1[idx]
    deq = (values * scale.unsqueeze(-1).double()).reshape(x.shape).float()
    return deq, codes.reshape(x.shape), scale_e4m3, scale_2


def test_nvfp4_qtensor_packs_codes_and_scales_as_modelopt() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    qt, scale, scale_2 = NVFP4QTensor.quantize(x, 16)
    deq_ref, codes_ref, scale_ref, scale_2_ref = _reference(x)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (8, 4)
    assert torch.equal(scale.float(), scale_ref.float()) and torch.equal(scale_2, scale_2_ref)
    packed = qt._quantized_data
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    # ModelOpt's layout: element 2i in the low nibble, 2i + 1 in the high nibble
    assert torch.equal((packed & 0xF).long(), codes_ref[:, 0::2])
    assert torch.equal((packed >> 4).long(), codes_ref[:, 1::2])
    deq = qt.dequantize(scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    torch.testing.assert_close(deq, deq_ref, rtol=0, atol=0)
    # given scales reproduce the same codes
    again, _, _ = NVFP4QTensor.quantize(x, 16, scale, scale_2)
    assert torch.equal(again._quantized_data, packed)


def test_nvfp4_qtensor_matches_the_quantizer_fake_quantization() -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q = mtq.TensorQuantizer(
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}
    )
    qt, scale, scale_2 = NVFP4QTensor.quantize(x, 16)
    deq = qt.dequantize(scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert deq.dtype == torch.bfloat16
    assert torch.equal(deq, q(x))
    with pytest.raises(ValueError, match="block size"):
        NVFP4QTensor.quantize(x, 12)


def test_nvfp4_static_quantizer_global_amax_is_the_largest_block_amax() -> None:
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    cfg = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}}
    tq = mtq.TensorQuantizer(cfg)
    tq.calibrate_from(w)
    out = tq(w)
    sq = NVFP4StaticQuantizer.from_tensor_quantizer(tq, global_amax=w.abs().max())
    assert sq is tq and isinstance(tq, NVFP4StaticQuantizer) and sq.has_quantized_block_scale
    assert float(sq.global_amax) == float(w.abs().max())
    assert torch.equal(sq(w), out)
    assert torch.equal(NVFP4QTensor.get_weights_scaling_factor_2(w), w.abs().max() / 2688)
    with pytest.raises(ValueError, match="largest block amax"):
        sq.global_amax = 2 * w.abs().max()
    with pytest.raises(ValueError, match="static NVFP4"):
        NVFP4StaticQuantizer.from_tensor_quantizer(mtq.TensorQuantizer({"num_bits": 8}))

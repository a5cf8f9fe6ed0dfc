"""Bit packing for export: INT4 and E2M1 codes two per byte, E8M0 scale bytes.

Nibble order follows ``torch.float4_e2m1fn_x2``: element ``2i`` in the low nibble of byte ``i``,
element ``2i+1`` in the high nibble. Packing runs along the last axis, which must be even.
"""

from __future__ import annotations

import torch

__all__ = [
    "e8m0_to_float",
    "exponent_to_e8m0",
    "pack_fp4",
    "pack_int4",
    "unpack_fp4",
    "unpack_int4",
]


def _pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    if nibbles.dim() == 0 or nibbles.shape[-1] % 2:
        raise ValueError(
            f"packing two per byte needs an even last dimension, got shape {tuple(nibbles.shape)}"
        )
    n = nibbles.to(torch.uint8) & 0xF
    return n[..., 0::2] | (n[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    p = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    out = torch.stack((p & 0xF, p >> 4), dim=-1)
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack INT4 codes (signed -8..7 or unsigned 0..15, any int dtype) two per byte into uint8."""
    if codes.is_floating_point():
        raise ValueError(f"pack_int4 expects integer codes, got dtype {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 15):
        raise ValueError(
            f"pack_int4 codes must lie in [-8, 15], got [{int(codes.min())}, {int(codes.max())}]"
        )
    return _pack_nibbles(codes)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes (-8..7 when ``signed``) or uint8 (0..15), last axis doubled."""
    n = _unpack_nibbles(packed)
    if not signed:
        return n
    n = n.to(torch.int8)
    return torch.where(n >= 8, n - 16, n)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 bit codes (uint8, 0..15: sign<<3 | exponent<<1 | mantissa) as ``torch.float4_e2m1fn_x2``."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_fp4 expects uint8 E2M1 codes, got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_fp4 codes must lie in [0, 15], got max {int(codes.max())}")
    return _pack_nibbles(codes).view(torch.float4_e2m1fn_x2)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 E2M1 bit codes, last axis doubled."""
    return _unpack_nibbles(packed)


def exponent_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Unbiased power-of-two exponents (-127..127, any int dtype) as ``torch.float8_e8m0fnu`` (bias 127)."""
    if exponent.is_floating_point():
        raise ValueError(f"exponent_to_e8m0 expects integer exponents, got dtype {exponent.dtype}")
    if exponent.numel() and (int(exponent.min()) < -127 or int(exponent.max()) > 127):
        raise ValueError(
            f"E8M0 exponents must lie in [-127, 127], got [{int(exponent.min())}, {int(exponent.max())}]"
        )
    return (exponent.to(torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scales (``float8_e8m0fnu`` or their uint8 bytes) to float32: 2**(code-127), NaN for 0xFF."""
    code = (scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale).to(torch.int32)
    return torch.where(code == 255, float("nan"), torch.exp2((code - 127).float()))

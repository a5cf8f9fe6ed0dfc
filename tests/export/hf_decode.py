"""An independent float64 decoder of the unified HF checkpoint's per-layer weight tensors (ModelOpt's layout)."""

from __future__ import annotations

import torch

# OCP FP4 E2M1 magnitudes by the low three bits of a code (bit 3 is the sign).
E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
NVFP4_ALGOS = ("NVFP4", "NVFP4_AWQ", "NVFP4_SVD", "W4A16_NVFP4")


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = packed.to(torch.int64)
    return p & 0xF, p >> 4


def _signed4(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n >= 8, n - 16, n)


def dequantize_hf(algo: str, t: dict[str, torch.Tensor], group: int | None) -> torch.Tensor:
    """Independent float64 dequantization of one layer's stored weight from its codes and scales."""
    w, s = t["weight"], t["weight_scale"]
    if algo == "FP8":
        return w.double() * s.double()
    if algo in ("W8A8_SQ_PER_CHANNEL", "W8A16", "FP8_PER_CHANNEL_PER_TOKEN"):
        return w.double() * s.double()[:, None]
    if algo == "W4A16_AWQ":  # uint8 (out/2, in): row 2r low nibble, row 2r+1 high nibble
        low, high = _nibbles(w)
        q = torch.empty(2 * w.shape[0], w.shape[1], dtype=torch.float64)
        q[0::2], q[1::2] = _signed4(low).double(), _signed4(high).double()
        return q * s.double().repeat_interleave(group, dim=1)[:, : q.shape[1]]
    if algo in NVFP4_ALGOS:  # uint8 (out, in/2): column 2c low nibble, 2c+1 high nibble
        low, high = _nibbles(w)
        codes = torch.stack((low, high), dim=-1).reshape(w.shape[0], -1)
        table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
        values = table[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).double()
        # the block scale as a kernel forms it: E4M3 scale times the fp32 global scale, in fp32
        block = (s.float() * t["weight_scale_2"].float()).double()
        return values * block.repeat_interleave(group, dim=1)
    raise AssertionError(algo)

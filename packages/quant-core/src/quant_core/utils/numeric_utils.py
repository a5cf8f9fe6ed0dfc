"""ModelOpt's ``quantization.utils.numeric_utils``: the closed-form MXFP4 -> NVFP4 cast.

An MXFP4 block holds 32 E2M1 codes under one power-of-two scale ``2^k`` (E8M0, stored as
``k + 127``; the byte 0 marks an all-zero block). NVFP4 holds blocks of 16 under an E4M3 scale
times a per-tensor float32 scale. Choosing the per-tensor scale ``2^m`` with ``m = k_max - 8``
puts every block scale ``2^(k - m)`` with ``k - m`` in ``[-9, 8]`` exactly on the E4M3 grid, so
those blocks re-encode to the same codes: the cast is lossless for them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import quant_kernels as qk
from quant_kernels.plan import FOUR_OVER_SIX_E4M3_MAX

__all__ = [
    "E2M1_MAX",
    "E4M3_KMAX",
    "E4M3_KMIN",
    "E4M3_MAX",
    "E4M3_MAX_46",
    "E8M0_BIAS",
    "fp8_max_for_normalization",
    "mxfp4_to_nvfp4_global_amax",
    "mxfp4_to_nvfp4_per_block_amax",
]

E8M0_BIAS = 127
"""An E8M0 byte stores the exponent ``k`` of its scale ``2^k`` as ``k + 127``."""
E2M1_MAX = qk.E2M1_MAX
"""Largest E2M1 magnitude (6)."""
E4M3_MAX = qk.E4M3_MAX
"""Largest finite E4M3 value (448)."""
E4M3_MAX_46 = FOUR_OVER_SIX_E4M3_MAX
"""The E4M3 block-scale ceiling of NVFP4 "four over six" (blocks scaled to 4 or 6 under it)."""
E4M3_KMAX = 8
"""Largest ``k`` with ``2^k`` exact in E4M3."""
E4M3_KMIN = -9
"""Smallest ``k`` with ``2^k`` exact in E4M3 (its smallest subnormal)."""

_E2M1_MAGNITUDES = qk.ElementFormat.parse((2, 1)).values()[:8].float()
"""E2M1 magnitudes by the low three bits of a code (bit 3 is the sign), from the format table."""
_E2M1_MAGNITUDE = _E2M1_MAGNITUDES.tolist()  # ModelOpt's name for the same values, as a list


@functools.cache
def _e2m1_magnitude_table(device: torch.device) -> torch.Tensor:
    """The E2M1 magnitudes on ``device``, made once per device (ModelOpt's name)."""
    return _E2M1_MAGNITUDES.to(device)


def _exponents(e8m0_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``k`` per block as int32, mask of the non-zero blocks)."""
    return e8m0_scales.to(torch.int32) - E8M0_BIAS, e8m0_scales != 0


def mxfp4_to_nvfp4_global_amax(e8m0_scales: torch.Tensor) -> tuple[float, dict[str, Any]]:
    """The NVFP4 global amax ``6 * 448 * 2^m`` (``m = k_max - 8``) for one MXFP4 tensor, and stats.

    ``e8m0_scales`` is the uint8 scale tensor of the MXFP4 source. Zero bytes (all-zero blocks)
    are left out of ``k_min`` / ``k_max`` (both 0 when every block is zero). The stats dict has
    ``k_min``, ``k_max``, ``m``, ``n_total_blocks``, ``n_lossless_blocks`` (blocks with
    ``k >= k_max - 17``, which re-encode exactly, and all-zero blocks), ``pct_lossless`` and
    ``n_zero_blocks``.
    """
    k, nonzero = _exponents(e8m0_scales)
    live = k[nonzero]
    k_min, k_max = (int(live.min()), int(live.max())) if live.numel() else (0, 0)
    m = k_max - E4M3_KMAX
    total = e8m0_scales.numel()
    lossless = int(((k - m >= E4M3_KMIN) | ~nonzero).sum())
    info = {
        "k_min": k_min,
        "k_max": k_max,
        "m": m,
        "n_total_blocks": total,
        "n_lossless_blocks": lossless,
        "pct_lossless": 100.0 * lossless / total if total else 100.0,
        "n_zero_blocks": int((~nonzero).sum()),
    }
    return E2M1_MAX * E4M3_MAX * 2.0**m, info


def mxfp4_to_nvfp4_per_block_amax(blocks: torch.Tensor, e8m0_scales: torch.Tensor) -> torch.Tensor:
    """The NVFP4 block amax (float32, ``(..., 2 * num_mxfp4_blocks)``) that re-encodes MXFP4 codes.

    ``blocks`` holds the packed codes, ``(..., num_mxfp4_blocks, 16)`` uint8 (two codes a byte);
    ``e8m0_scales`` is ``(..., num_mxfp4_blocks)``. A block whose scale fits the E4M3 window
    under ``m = k_max - 8`` gets ``6 * 2^k`` (its codes come back unchanged); one outside it gets
    its largest magnitude, ``max|code| * 2^k``. Both NVFP4 blocks of an MXFP4 block share it.
    """
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != e8m0_scales.shape:
        raise ValueError(
            f"shape mismatch: blocks {tuple(blocks.shape)} must be (..., num_mxfp4_blocks, 16) "
            f"for scales {tuple(e8m0_scales.shape)}"
        )
    k, nonzero = _exponents(e8m0_scales)
    scale = torch.exp2(k.float())
    k_max = torch.where(nonzero, k, torch.full_like(k, -E8M0_BIAS)).amax()
    offset = k - (k_max - E4M3_KMAX)
    fits = (offset >= E4M3_KMIN) & (offset <= E4M3_KMAX)
    amax = E2M1_MAX * scale
    if not bool(fits.all()):
        code = torch.maximum(blocks & 0x7, (blocks >> 4) & 0x7).amax(dim=-1).long()
        largest = _e2m1_magnitude_table(blocks.device)[code] * scale
        amax = torch.where(fits, amax, largest)
    return amax.repeat_interleave(2, dim=-1)


def fp8_max_for_normalization(quantizer: object) -> float:
    """The E4M3 ceiling block scales are normalized to: 256 under "four over six", else 448."""
    block_sizes = getattr(quantizer, "block_sizes", None) or {}
    return E4M3_MAX_46 if bool(block_sizes.get("four_over_six", False)) else E4M3_MAX

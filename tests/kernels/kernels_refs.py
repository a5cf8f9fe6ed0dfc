"""Independent float64 references for the kernels tests: spec value tables and textbook formulas.

Nothing here calls quant_kernels; values come from the OCP specs' tables, torch's native float8
dtypes, and float64 arithmetic.
"""

from __future__ import annotations

import math

import torch

# OCP MX spec v1.0, tables: positive values of each element format, by code (sign bit clear).
E2M1_POSITIVE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP_MAX = {(4, 3): 448.0, (5, 2): 57344.0, (3, 2): 28.0, (2, 3): 7.5, (2, 1): 6.0}
FP_BIAS = {(4, 3): 7, (5, 2): 15, (3, 2): 3, (2, 3): 1, (2, 1): 1}


def fp_positive_values(e: int, m: int) -> list[float]:
    """Positive finite values by code for a small OCP float (spec formula), float64."""
    if (e, m) == (4, 3):
        codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
        return [v for v in codes.tolist() if math.isfinite(v)]
    if (e, m) == (5, 2):
        codes = torch.arange(128, dtype=torch.uint8).view(torch.float8_e5m2).double()
        return [v for v in codes.tolist() if math.isfinite(v)]
    bias = FP_BIAS[(e, m)]
    out = []
    for code in range(2 ** (e + m)):
        exp, man = code >> m, code & (2**m - 1)
        if exp == 0:
            out.append(man / 2**m * 2.0 ** (1 - bias))
        else:
            out.append((1 + man / 2**m) * 2.0 ** (exp - bias))
    return out


def round_to_table(v: torch.Tensor, positive: list[float]) -> torch.Tensor:
    """Nearest table value with ties to the even code, saturating at the max; sign kept, NaN kept (float64)."""
    table = torch.tensor(positive, dtype=torch.float64)
    a = v.abs().clamp(max=table[-1].item())
    hi = torch.searchsorted(table, a).clamp(max=len(positive) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    pick = torch.where(d_lo < d_hi, lo, hi)
    pick = torch.where(d_lo == d_hi, torch.where(lo % 2 == 0, lo, hi), pick)
    out = torch.copysign(table[pick], v)
    return torch.where(torch.isnan(v), v, out)


def _div32(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as one IEEE float32 division (the documented semantics, as ONNX QuantizeLinear), in float64."""
    return (x.float() / scale.float()).double()


def int_range(bits: int, unsigned: bool, narrow: bool) -> tuple[int, int]:
    """(qmin, qmax) of an INT grid."""
    if unsigned:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def int_fake_quant64(
    x: torch.Tensor, amax: torch.Tensor, bits: int, unsigned=False, narrow=False
) -> torch.Tensor:
    """INT fake quant: scale = float32(amax / qmax); round(float32(x / scale)) half-even, clamped, times scale."""
    qmin, qmax = int_range(bits, unsigned, narrow)
    scale = (amax.double() / qmax).float().double()
    safe = torch.where(scale == 0, 1.0, scale)
    q = torch.round(_div32(x, safe)).clamp(qmin, qmax)
    return (q * scale).float().double()  # the product is a float32 value


def fp_fake_quant64(x: torch.Tensor, amax: torch.Tensor, e: int, m: int) -> torch.Tensor:
    """float64 FP fake quant: scale = float32(amax / max); nearest-even on the format's table; times scale."""
    top = FP_MAX[(e, m)]
    scale = (amax.double() / top).float().double()
    safe = torch.where(scale == 0, 1.0, scale)
    return (round_to_table(_div32(x, safe), fp_positive_values(e, m)) * scale).float().double()


def block_view(x: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, blocks, block) view of a 2D tensor whose last dim the block divides."""
    return x.reshape(x.shape[0], x.shape[1] // block, block)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    x, y = x.double(), y.double()
    return 20 * math.log10(x.norm().item() / max((x - y).norm().item(), 1e-300))


# One case per format and granularity the kernels handle (fake_quantize keyword arguments).
FORMAT_CASES = [
    {"num_bits": 8},  # per-tensor dynamic: elementwise kernel
    {"num_bits": 8, "axis": 0},
    {"num_bits": 8, "axis": -1},  # per-column static
    {"num_bits": 4, "block_sizes": {-1: 32}},
    {"num_bits": 8, "block_sizes": {-1: 64}, "narrow_range": True},
    {"num_bits": 4, "block_sizes": {-1: 32}, "unsigned": True},
    {"num_bits": (4, 3)},
    {"num_bits": (4, 3), "block_sizes": {-1: None}},
    {"num_bits": (5, 2), "block_sizes": {-1: None}},
    {"num_bits": (4, 3), "block_sizes": {-1: 32, -2: 16}},
    {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)},
    {"num_bits": (4, 3), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": (3, 2), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": (2, 3), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": (2, 1), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
    {"num_bits": 8, "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, except that any NaN equals any NaN."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return torch.equal(a.view(view)[~nan], b.view(view)[~nan])

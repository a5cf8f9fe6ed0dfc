"""The format table: element formats (INT, FP8, FP6, FP4, E8M0) and the named formats built on them.

`ElementFormat` describes one scalar encoding (its grid, range and bit layout); `FORMATS` maps a
name such as ``"NVFP4"`` to a `FormatSpec` row (element, block, scale format, effective bits,
export names). Numerics, export and AutoQuantize all read this one table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["FORMATS", "ElementFormat", "FormatSpec"]

# (exponent bits, mantissa bits) -> (name, exponent bias, largest finite value, torch dtype name or None)
_FP_LAYOUTS: dict[tuple[int, int], tuple[str, int, float, str | None]] = {
    (4, 3): ("e4m3", 7, 448.0, "float8_e4m3fn"),  # OCP FP8 E4M3: no inf, S.1111.111 is NaN
    (5, 2): ("e5m2", 15, 57344.0, "float8_e5m2"),  # OCP FP8 E5M2: IEEE-like, has inf
    (3, 2): ("e3m2", 3, 28.0, None),  # OCP FP6 E3M2: no inf/NaN
    (2, 3): ("e2m3", 1, 7.5, None),  # OCP FP6 E2M3: no inf/NaN
    (2, 1): ("e2m1", 1, 6.0, "float4_e2m1fn_x2"),  # OCP FP4 E2M1: no inf/NaN
}


@dataclass(frozen=True)
class ElementFormat:
    """One scalar encoding: an integer grid (``kind="int"``) or a small float (``kind="fp"``).

    For INT the grid is the integers in ``[qmin, qmax]`` (scale = amax / qmax); for FP it is the
    format's finite values with ``max_value`` the largest (scale = amax / max_value).
    """

    name: str
    kind: str  # "int" or "fp"
    bits: int
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    max_value: float = 0.0
    unsigned: bool = False
    torch_dtype: str | None = None

    @classmethod
    def parse(cls, num_bits: int | tuple[int, int], unsigned: bool = False) -> ElementFormat:
        """Element format for a ModelOpt-style ``num_bits``: an int (2..8, INT) or an (exponent, mantissa) pair."""
        key = tuple(num_bits) if isinstance(num_bits, (tuple, list)) else num_bits
        try:
            return _parse_cached(cls, key, bool(unsigned))
        except TypeError:  # unhashable: let _parse report it
            return cls._parse(num_bits, unsigned)

    @classmethod
    def _parse(cls, num_bits: int | tuple[int, int], unsigned: bool = False) -> ElementFormat:
        if isinstance(num_bits, bool):
            raise ValueError(
                f"num_bits must be an int or an (exponent, mantissa) pair, got {num_bits!r}"
            )
        if isinstance(num_bits, int):
            if not 2 <= num_bits <= 8:
                raise ValueError(
                    f"num_bits={num_bits} is not supported: INT formats have 2..8 bits"
                )
            return cls(
                name=f"{'u' if unsigned else ''}int{num_bits}",
                kind="int",
                bits=num_bits,
                max_value=float(2 ** (num_bits - (0 if unsigned else 1)) - 1),
                unsigned=unsigned,
                torch_dtype="uint8" if unsigned else "int8",
            )
        pair = tuple(num_bits) if isinstance(num_bits, (tuple, list)) else None
        if pair is None or len(pair) != 2 or pair not in _FP_LAYOUTS:
            raise ValueError(
                f"num_bits={num_bits!r} is not a supported FP format; choose one of {sorted(_FP_LAYOUTS)}"
            )
        if unsigned:
            raise ValueError(
                f"unsigned=True is only supported for INT formats, not num_bits={num_bits!r}"
            )
        name, bias, max_value, dtype = _FP_LAYOUTS[pair]
        e, m = pair
        return cls(name, "fp", 1 + e + m, e, m, bias, max_value, False, dtype)

    @property
    def is_int(self) -> bool:
        """True for the integer grids."""
        return self.kind == "int"

    @property
    def num_bits(self) -> int | tuple[int, int]:
        """The ModelOpt-style ``num_bits`` that parses back to this format."""
        return self.bits if self.is_int else (self.exponent_bits, self.mantissa_bits)

    @property
    def min_normal_exponent(self) -> int:
        """FP only: exponent of the smallest normal value (1 - bias); subnormals share its step."""
        return 1 - self.bias

    @property
    def mx_shift(self) -> int:
        """MX only: log2 of the implicit element scale, ``bits - 2`` for INT grids (MXINT8 is 1.6 fixed point), 0 for FP."""
        return self.bits - 2 if self.is_int else 0

    @property
    def top_step(self) -> float:
        """Spacing of the grid at its largest magnitude (INT: 1; FP: the top binade's step)."""
        if self.is_int:
            return 1.0
        top_exponent = math.floor(math.log2(self.max_value))
        return 2.0 ** (top_exponent - self.mantissa_bits)

    def int_range(self, narrow_range: bool = False) -> tuple[int, int]:
        """INT only: ``(qmin, qmax)``; signed full range is ``[-qmax-1, qmax]``, narrow ``[-qmax, qmax]``."""
        qmax = int(self.max_value)
        if self.unsigned:
            return 0, qmax
        return (-qmax if narrow_range else -qmax - 1), qmax

    def values(self) -> torch.Tensor:
        """Every code's value, indexed by code (float64): 2**bits entries; FP8 NaN codes are NaN."""
        codes = torch.arange(2**self.bits, dtype=torch.int64)
        if self.is_int:
            if self.unsigned:
                return codes.double()
            return torch.where(codes >= 2 ** (self.bits - 1), codes - 2**self.bits, codes).double()
        e, m = self.exponent_bits, self.mantissa_bits
        sign = torch.where((codes >> (e + m)) & 1 == 1, -1.0, 1.0).double()
        exp = (codes >> m) & (2**e - 1)
        man = (codes & (2**m - 1)).double()
        normal = (1 + man / 2**m) * torch.pow(2.0, (exp - self.bias).double())
        subnormal = man / 2**m * 2.0 ** (1 - self.bias)
        mag = torch.where(exp == 0, subnormal, normal)
        mag = torch.where(mag > self.max_value, float("nan"), mag)  # NaN/inf encodings
        if self.name == "e5m2":
            mag = torch.where((exp == 31) & (man == 0), float("inf"), mag)
        return sign * mag


@functools.lru_cache(maxsize=64)
def _parse_cached(cls: type[ElementFormat], num_bits, unsigned: bool) -> ElementFormat:
    return cls._parse(num_bits, unsigned)


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table: a named quantization format and how each layer names it."""

    name: str
    num_bits: int | tuple[int, int]
    block_sizes: dict[int, int | None] | None = None
    scale_bits: tuple[int, int] | None = (
        None  # block-scale format: None = float32, (4, 3) E4M3, (8, 0) E8M0
    )
    axis: int | None = None  # per-channel axis for weights (None = per-tensor or block-wise)
    scale_storage_bits: int = 32  # bits stored per scale in an exported checkpoint
    onnx_dtype: str | None = None  # ONNX TensorProto element type name of the codes
    storage_dtype: str | None = None  # torch dtype name of the exported codes
    trtllm_quant_algo: str | None = None  # TensorRT-LLM QuantAlgo when weights use this format
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def element(self) -> ElementFormat:
        """The element format of the codes."""
        return ElementFormat.parse(self.num_bits)

    @property
    def block_size(self) -> int | None:
        """Elements per block along the last axis, or None when not block-wise along it."""
        return (self.block_sizes or {}).get(-1)

    @property
    def effective_bits(self) -> float:
        """Bits per element including the per-block scale (per-tensor/channel scales count as 0)."""
        bits = float(self.element.bits)
        if self.block_sizes:
            elems = 1
            for size in self.block_sizes.values():
                elems *= size or 1
            if elems > 1:
                bits += self.scale_storage_bits / elems
        return bits

    def fake_quantize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `quant_kernels.fake_quantize` (add ``amax``/``global_amax`` for static)."""
        return {
            "num_bits": self.num_bits,
            "block_sizes": dict(self.block_sizes) if self.block_sizes else None,
            "scale_bits": self.scale_bits,
        }


def _rows(*specs: FormatSpec) -> MappingProxyType:
    return MappingProxyType({spec.name: spec for spec in specs})


FORMATS: MappingProxyType = _rows(
    FormatSpec(
        "INT8",
        8,
        axis=0,
        onnx_dtype="INT8",
        storage_dtype="int8",
        trtllm_quant_algo="W8A16",
        description="INT8, per-channel weights (axis 0) / per-tensor activations",
    ),
    FormatSpec(
        "INT8_BLOCK",
        8,
        {-1: 128},
        scale_storage_bits=16,
        onnx_dtype="INT8",
        storage_dtype="int8",
        trtllm_quant_algo="W8A16",
        description="INT8, blocks of 128 along the last axis",
    ),
    FormatSpec(
        "INT4",
        4,
        {-1: 128},
        scale_storage_bits=16,
        onnx_dtype="INT4",
        storage_dtype="uint8",
        trtllm_quant_algo="W4A16_AWQ",
        description="INT4 weights, blocks of 128, two codes per byte",
    ),
    FormatSpec(
        "INT4_BLOCK64",
        4,
        {-1: 64},
        scale_storage_bits=16,
        onnx_dtype="INT4",
        storage_dtype="uint8",
        trtllm_quant_algo="W4A16_AWQ",
        description="INT4 weights, blocks of 64, two codes per byte",
    ),
    FormatSpec(
        "FP8",
        (4, 3),
        onnx_dtype="FLOAT8E4M3FN",
        storage_dtype="float8_e4m3fn",
        trtllm_quant_algo="FP8",
        description="FP8 E4M3 (max 448), per-tensor",
    ),
    FormatSpec(
        "FP8_PER_CHANNEL",
        (4, 3),
        axis=0,
        onnx_dtype="FLOAT8E4M3FN",
        storage_dtype="float8_e4m3fn",
        trtllm_quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
        description="FP8 E4M3 per-channel weights; per-token dynamic activations use block_sizes={-1: None}",
    ),
    FormatSpec(
        "FP8_BLOCK",
        (4, 3),
        {-1: 128, -2: 128},
        onnx_dtype="FLOAT8E4M3FN",
        storage_dtype="float8_e4m3fn",
        trtllm_quant_algo="FP8_BLOCK_SCALES",
        description="FP8 E4M3 with 128x128 blocks (DeepSeek-style)",
    ),
    FormatSpec(
        "FP8_E5M2",
        (5, 2),
        onnx_dtype="FLOAT8E5M2",
        storage_dtype="float8_e5m2",
        description="FP8 E5M2 (max 57344), per-tensor",
    ),
    FormatSpec("FP6_E3M2", (3, 2), description="FP6 E3M2 (max 28), per-tensor; codes one per byte"),
    FormatSpec(
        "FP6_E2M3", (2, 3), description="FP6 E2M3 (max 7.5), per-tensor; codes one per byte"
    ),
    FormatSpec(
        "FP4",
        (2, 1),
        onnx_dtype="FLOAT4E2M1",
        storage_dtype="float4_e2m1fn_x2",
        description="FP4 E2M1 (max 6), per-tensor",
    ),
    FormatSpec(
        "NVFP4",
        (2, 1),
        {-1: 16},
        (4, 3),
        scale_storage_bits=8,
        onnx_dtype="FLOAT4E2M1",
        storage_dtype="float4_e2m1fn_x2",
        trtllm_quant_algo="NVFP4",
        description="NVFP4: E2M1, blocks of 16, E4M3 block scales, FP32 global scale amax/(6*448)",
    ),
    FormatSpec(
        "MXFP8",
        (4, 3),
        {-1: 32},
        (8, 0),
        scale_storage_bits=8,
        onnx_dtype="FLOAT8E4M3FN",
        storage_dtype="float8_e4m3fn",
        description="OCP MXFP8: E4M3, blocks of 32, E8M0 scales",
    ),
    FormatSpec(
        "MXFP6_E3M2",
        (3, 2),
        {-1: 32},
        (8, 0),
        scale_storage_bits=8,
        description="OCP MXFP6 E3M2, blocks of 32, E8M0 scales",
    ),
    FormatSpec(
        "MXFP6_E2M3",
        (2, 3),
        {-1: 32},
        (8, 0),
        scale_storage_bits=8,
        description="OCP MXFP6 E2M3, blocks of 32, E8M0 scales",
    ),
    FormatSpec(
        "MXFP4",
        (2, 1),
        {-1: 32},
        (8, 0),
        scale_storage_bits=8,
        onnx_dtype="FLOAT4E2M1",
        storage_dtype="float4_e2m1fn_x2",
        trtllm_quant_algo="W4A16_MXFP4",
        description="OCP MXFP4: E2M1, blocks of 32, E8M0 scales",
    ),
    FormatSpec(
        "MXINT8",
        8,
        {-1: 32},
        (8, 0),
        scale_storage_bits=8,
        onnx_dtype="INT8",
        storage_dtype="int8",
        description="OCP MXINT8: INT8 (1.6 fixed point), blocks of 32, E8M0 scales",
    ),
)

"""The format table: element formats (INT, FP8, FP6, FP4, E8M0) and the named formats built on them.

`ElementFormat` describes one scalar encoding (its grid, range and bit layout); `FORMATS` maps a
name such as ``"NVFP4"`` to a `FormatSpec` row (element, block, scale format, effective bits,
export names). `QuantFormat` is one quantizer's format, parsed once from ModelOpt-style
attributes (``num_bits``, ``axis``, ``block_sizes``, ...); it names its `FORMATS` row, so
numerics, summaries, algorithms, export and AutoQuantize read this one table instead of
comparing ``num_bits`` / ``scale_bits`` tuples. `nvfp4_global_amax` owns NVFP4's global-amax rule.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "FORMATS",
    "FP_ELEMENT_NAMES",
    "INT_BITS",
    "SCALE_MODES",
    "ElementFormat",
    "FormatSpec",
    "QuantFormat",
    "ScaleMode",
    "check_block_sizes",
    "nvfp4_global_amax",
]

# (exponent bits, mantissa bits) -> (name, exponent bias, largest finite value, torch dtype name or None)
_FP_LAYOUTS: dict[tuple[int, int], tuple[str, int, float, str | None]] = {
    (4, 3): ("e4m3", 7, 448.0, "float8_e4m3fn"),  # OCP FP8 E4M3: no inf, S.1111.111 is NaN
    (5, 2): ("e5m2", 15, 57344.0, "float8_e5m2"),  # OCP FP8 E5M2: IEEE-like, has inf
    (3, 2): ("e3m2", 3, 28.0, None),  # OCP FP6 E3M2: no inf/NaN
    (2, 3): ("e2m3", 1, 7.5, None),  # OCP FP6 E2M3: no inf/NaN
    (2, 1): ("e2m1", 1, 6.0, "float4_e2m1fn_x2"),  # OCP FP4 E2M1: no inf/NaN
}
FP_ELEMENT_NAMES: MappingProxyType = MappingProxyType(
    {pair: layout[0].upper() for pair, layout in _FP_LAYOUTS.items()}
)
"""The supported FP ``num_bits`` pairs and their names: ``{(4, 3): "E4M3", ...}``."""

E4M3_MAX: float = _FP_LAYOUTS[(4, 3)][2]
"""Largest finite FP8 E4M3 value (448): FP8 scales are amax / E4M3_MAX, and NVFP4's block scales
are E4M3 values, so its global scale is global amax / (E2M1_MAX * E4M3_MAX)."""
E2M1_MAX: float = _FP_LAYOUTS[(2, 1)][2]
"""Largest finite FP4 E2M1 value (6)."""


class ScaleMode(enum.Enum):
    """How a format's group scales are stored (its value is the short name used in messages)."""

    FLOAT32 = "float32"  # one float32 scale per tensor / channel / token / block
    E4M3 = "e4m3"  # E4M3 block scales under a float32 global scale (NVFP4-style, two levels)
    E8M0 = "e8m0"  # E8M0 shared exponents (OCP MX)

    @property
    def storage_bits(self) -> int:
        """Bits stored per scale."""
        return 32 if self is ScaleMode.FLOAT32 else 8


SCALE_MODES: MappingProxyType = MappingProxyType(
    {None: ScaleMode.FLOAT32, (4, 3): ScaleMode.E4M3, (8, 0): ScaleMode.E8M0}
)
"""``scale_bits`` -> how group scales are stored (a `ScaleMode`)."""

INT_BITS = range(2, 17)
"""Integer ``num_bits`` supported: 2..16. Wider grids would need more than float32's 24-bit
significand for exact rounding (ModelOpt takes any positive int and computes in float32 too)."""


def _int_code_dtype(bits: int, unsigned: bool) -> str:
    """torch dtype name of the codes of an INT grid: the narrowest of int8/uint8/int16/int32 holding it."""
    if bits <= 8:
        return "uint8" if unsigned else "int8"
    return "int32" if unsigned and bits == 16 else "int16"


# ONNX TensorProto element type of each element format's codes (None: ONNX has none).
_ONNX_ELEMENT = {
    "int16": "INT16",
    "uint16": "UINT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int4": "INT4",
    "uint4": "UINT4",
    "e4m3": "FLOAT8E4M3FN",
    "e5m2": "FLOAT8E5M2",
    "e2m1": "FLOAT4E2M1",
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
        """Element format for a ModelOpt-style ``num_bits``: an int (INT, `INT_BITS`) or an (exponent, mantissa) pair."""
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
            if num_bits not in INT_BITS:
                raise ValueError(
                    f"num_bits={num_bits} is not supported: INT formats have "
                    f"{INT_BITS.start}..{INT_BITS.stop - 1} bits"
                )
            return cls(
                name=f"{'u' if unsigned else ''}int{num_bits}",
                kind="int",
                bits=num_bits,
                max_value=float(2 ** (num_bits - (0 if unsigned else 1)) - 1),
                unsigned=unsigned,
                torch_dtype=_int_code_dtype(num_bits, unsigned),
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
    def onnx_dtype(self) -> str | None:
        """ONNX TensorProto element type name of the codes (``"INT8"``, ``"FLOAT8E4M3FN"``, ...), or None."""
        return _ONNX_ELEMENT.get(self.name)

    @property
    def packed_nibbles(self) -> bool:
        """True for 4-bit codes, stored two per byte."""
        return self.bits == 4

    def bounds(self, narrow_range: bool = False) -> tuple[float, float]:
        """``(lo, hi)`` of the grid in element units: the INT code range, or ``±max_value`` for FP."""
        if self.is_int:
            lo, hi = self.int_range(narrow_range)
            return float(lo), float(hi)
        return -self.max_value, self.max_value

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


def nvfp4_global_amax(
    block_amax: torch.Tensor | None = None,
    calibrated: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """NVFP4's per-tensor (global) amax, which sets the float32 second-level scale ``amax / (M * E4M3_MAX)``
    (``amax / (M * 256)`` for "four over six", whose blocks keep their max |x| as amax and choose
    the scale of ``amax`` or ``1.5 * amax`` in the kernels, so this rule holds for it too).

    The one rule every layer uses: a ``calibrated`` global amax when there is one (a dynamic
    quantizer's ``amax`` buffer holds it); else the largest per-block amax (static quantizers,
    and the kernels' groups of a dynamic call); else ``max |x|``. None when nothing is given.
    """
    if calibrated is not None:
        return calibrated.float().reshape(())
    for name, t in (("block_amax", block_amax), ("x", x)):
        if t is not None and t.numel() == 0:
            raise ValueError(
                f"nvfp4_global_amax: {name} is empty (shape {tuple(t.shape)}), so it has no maximum"
            )
    if block_amax is not None:
        return block_amax.max()
    if x is not None:
        return x.detach().abs().amax().float()
    return None


def check_four_over_six(
    element: ElementFormat, scale_mode: ScaleMode, num_bits: Any, scale_bits: Any
) -> None:
    """ValueError unless the format is NVFP4 (E2M1 elements, E4M3 block scales), the only one
    ``block_sizes["four_over_six"]`` applies to."""
    if scale_mode is not ScaleMode.E4M3 or element.name != "e2m1":
        raise ValueError(
            "block_sizes['four_over_six'] needs NVFP4: num_bits=(2, 1) with scale_bits=(4, 3); "
            f"got num_bits={num_bits!r}, scale_bits={scale_bits!r}"
        )


@dataclass(frozen=True)
class QuantFormat:
    """One quantizer's format, parsed once from its ModelOpt-style attributes (`QuantFormat.parse`).

    ``element`` is the code grid, ``scale_mode`` how group scales are stored (see `SCALE_MODES`),
    ``blocks`` the integer axes of ``block_sizes`` as ``((axis, size or None), ...)`` in the order
    given, ``axis`` the per-channel axis (None: per tensor), ``dynamic`` whether the amax comes
    from each input. `row` is the matching `FORMATS` row (None for formats outside the table,
    which still quantize); names, storage dtypes, export names and effective bits come from it.
    """

    element: ElementFormat
    scale_mode: ScaleMode = ScaleMode.FLOAT32
    blocks: tuple[tuple[int, int | None], ...] = ()
    axis: int | tuple[int, ...] | None = None
    dynamic: bool = False
    narrow_range: bool = False
    four_over_six: bool = False

    @classmethod
    def parse(
        cls,
        num_bits: int | tuple[int, int] = 8,
        axis: int | tuple[int, ...] | None = None,
        block_sizes: dict | None = None,
        type: str = "static",
        unsigned: bool = False,
        narrow_range: bool = False,
    ) -> QuantFormat:
        """The format of a quantizer with these attributes (ModelOpt's names; ``block_sizes`` may
        carry ``"type"``, ``"scale_bits"`` and ``"four_over_six"``). ValueError names a bad value."""
        if block_sizes is not None and not isinstance(block_sizes, Mapping):
            raise ValueError(f"block_sizes must be a dict like {{-1: 128}}, got {block_sizes!r}")
        items = tuple((block_sizes or {}).items())
        key = (
            tuple(num_bits) if isinstance(num_bits, list) else num_bits,
            tuple(axis) if isinstance(axis, list) else axis,
            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items),
            type,
            bool(unsigned),
            bool(narrow_range),
        )
        try:
            return _parse_format(*key)
        except TypeError:  # unhashable value: let _parse_format report it unhashed
            return _parse_format.__wrapped__(*key)

    # ----- attributes in ModelOpt's terms ------------------------------------------------------
    @property
    def num_bits(self) -> int | tuple[int, int]:
        """The element's ``num_bits`` (an int, or an (exponent, mantissa) pair)."""
        return self.element.num_bits

    @property
    def unsigned(self) -> bool:
        """True for unsigned INT grids."""
        return self.element.unsigned

    @property
    def scale_bits(self) -> tuple[int, int] | None:
        """ModelOpt's ``block_sizes["scale_bits"]``: (4, 3) E4M3, (8, 0) E8M0, None for float32."""
        return next(bits for bits, mode in SCALE_MODES.items() if mode == self.scale_mode)

    @property
    def block_axes(self) -> dict[int, int | None] | None:
        """``{axis: block size or None}`` of ``block_sizes`` without its string keys, or None."""
        return dict(self.blocks) if self.blocks else None

    @property
    def block_size(self) -> int | None:
        """Elements per block along the last axis, or None when not block-wise along it."""
        return dict(self.blocks).get(-1)

    @property
    def sized_blocks(self) -> dict[int, int]:
        """The block axes with a size (``{-1: None}``, one group per row, is not a block format)."""
        return {a: b for a, b in self.blocks if b is not None}

    @property
    def has_global_amax(self) -> bool:
        """True for two-level scales (NVFP4): E4M3 block scales under a per-tensor global scale."""
        return self.scale_mode is ScaleMode.E4M3

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)`` of the grid in element units (see `ElementFormat.bounds`)."""
        return self.element.bounds(self.narrow_range)

    @property
    def kernel_block_sizes(self) -> dict[int | str, Any] | None:
        """`block_axes` plus ``"four_over_six": True`` when set: ``fake_quantize``'s ``block_sizes``."""
        axes = self.block_axes
        return {**axes, "four_over_six": True} if axes and self.four_over_six else axes

    def global_amax(
        self, amax: torch.Tensor | None, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """NVFP4's global amax for a quantizer of this format holding ``amax`` (see `nvfp4_global_amax`;
        four over six keeps the rule and divides it by ``6 * 256`` instead of ``6 * 448``):
        a dynamic quantizer's ``amax`` is the calibrated global amax, a static one's the per-block
        amaxes. None for formats without a global scale."""
        if not self.has_global_amax:
            return None
        if self.dynamic:
            return nvfp4_global_amax(calibrated=amax, x=x)
        return nvfp4_global_amax(block_amax=amax, x=x)

    # ----- the table row and what it names -----------------------------------------------------
    @functools.cached_property
    def row(self) -> FormatSpec | None:
        """The `FORMATS` row of this format: same element, scale format and sized blocks; among
        rows differing only in granularity, the per-channel row for per-channel/per-token
        quantizers and the per-tensor row otherwise. None when the table has no such format."""
        rows = [r for r in self._family() if dict(r.block_sizes or {}) == self.sized_blocks]
        per_row = self.axis is not None or any(b is None for _, b in self.blocks)
        rows.sort(key=lambda r: (r.axis is not None) != per_row)
        return rows[0] if rows else None

    def _family(self) -> list[FormatSpec]:
        return [
            r
            for r in FORMATS.values()
            if r.element == self.element and SCALE_MODES[r.scale_bits] == self.scale_mode
        ]

    @property
    def name(self) -> str:
        """The `FORMATS` row name (``"NVFP4"``, ``"FP8"``, ...), else the short `label`."""
        return self.row.name if self.row is not None else self.label

    @property
    def label(self) -> str:
        """A short human-readable name: INT8, UINT4, FP8 E4M3, NVFP4, MXFP6, MXINT8, NVFP4 (block 32), ..."""
        element = self.element
        kind = "INT" if element.is_int else "FP"
        if self.scale_mode is ScaleMode.FLOAT32:
            if element.is_int:
                return f"{'U' if element.unsigned else ''}INT{element.bits}"
            return f"FP{element.bits} {element.name.upper()}"
        label = f"{'MX' if self.scale_mode is ScaleMode.E8M0 else 'NV'}{kind}{element.bits}"
        standard = [dict(r.block_sizes or {}) for r in self._family() if r.block_sizes]
        sizes = list(self.sized_blocks.values())
        if standard and sizes and sizes != list(standard[0].values()):
            label += f" (block {sizes[0]})" if len(sizes) == 1 else f" (blocks {self.sized_blocks})"
        return label + " 4/6" if self.four_over_six else label

    @property
    def effective_bits(self) -> float:
        """Bits per element including the stored block scales: the row's, else the element's bits
        plus the family's scale storage per block (per-tensor/channel/token scales count 0)."""
        if self.row is not None:
            return self.row.effective_bits
        elems = math.prod(self.sized_blocks.values())
        if elems <= 1:
            return float(self.element.bits)
        family = [r for r in self._family() if r.block_sizes]
        bits = family[0].scale_storage_bits if family else self.scale_mode.storage_bits
        return self.element.bits + bits / elems

    @property
    def onnx_dtype(self) -> str | None:
        """ONNX element type name of the codes (see `ElementFormat.onnx_dtype`)."""
        return self.element.onnx_dtype

    @property
    def storage_dtype(self) -> str | None:
        """torch dtype name of the exported codes (from the row, or a row of the same element and
        scale format when the block size is not in the table), or None."""
        rows = [self.row] if self.row is not None else self._family()
        return rows[0].storage_dtype if rows else None

    @property
    def trtllm_quant_algo(self) -> str | None:
        """TensorRT-LLM ``QuantAlgo`` of weights in this format (from the row), or None."""
        return self.row.trtllm_quant_algo if self.row is not None else None


def _is_axis(key: Any) -> bool:
    return isinstance(key, int) and not isinstance(key, bool)


def check_block_sizes(block_sizes: Any) -> dict[int | str, Any]:
    """The one validator of ModelOpt's ``block_sizes`` dict: the config schema,
    `QuantFormat.parse` and the keyword API (`quant_kernels.blocking.normalize_block_sizes`) all
    call it.

    Integer axes (JSON's digit strings too) with a positive size or None; ``"type"`` ``"static"``
    or ``"dynamic"``; ``"scale_bits"`` a key of `quant_kernels.formats.SCALE_MODES` (a list becomes
    a tuple); ``"four_over_six"`` True or False; ``"scale_block_sizes"`` only empty (ModelOpt's
    double quantization is not supported; an empty one is dropped); at least one axis. Returns the
    dict so normalized; ValueError names the bad key or value.
    """
    if not isinstance(block_sizes, Mapping):
        raise ValueError(f"block_sizes must be a dict like {{-1: 128}}, got {block_sizes!r}")
    out: dict[int | str, Any] = {}
    for key, val in block_sizes.items():
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)  # JSON turns int keys into strings
        if _is_axis(key):
            if val is not None and (not _is_axis(val) or val <= 0):
                raise ValueError(
                    f"block_sizes[{key}]: the block size for axis {key} must be a positive int or None, "
                    f"got {val!r}"
                )
        elif key == "type":
            if val not in ("static", "dynamic"):
                raise ValueError(f"block_sizes['type'] must be 'static' or 'dynamic', got {val!r}")
        elif key == "scale_bits":
            val = tuple(val) if isinstance(val, list) else val
            if val not in SCALE_MODES:
                raise ValueError(
                    f"block_sizes['scale_bits'] must be one of {list(SCALE_MODES)}, got {val!r}"
                )
        elif key == "four_over_six":
            if not isinstance(val, bool):
                raise ValueError(f"block_sizes['four_over_six'] must be True or False, got {val!r}")
        elif key == "scale_block_sizes":
            if val:
                raise ValueError(
                    "block_sizes['scale_block_sizes'] (double quantization) is not supported"
                )
            continue
        else:
            raise ValueError(
                f"unknown block_sizes key {key!r}; allowed: int axes, 'type', 'scale_bits', "
                "'four_over_six'"
            )
        out[key] = val
    if not any(_is_axis(k) for k in out):
        raise ValueError(
            f"block_sizes {dict(block_sizes)!r} names no axis (scale_bits needs block_sizes with "
            "an axis, e.g. {-1: 16})"
        )
    return out


@functools.lru_cache(maxsize=256)
def _parse_format(num_bits, axis, blocks, type_, unsigned, narrow_range) -> QuantFormat:
    if type_ not in ("static", "dynamic"):
        raise ValueError(f"type must be 'static' or 'dynamic', got {type_!r}")
    element = ElementFormat.parse(num_bits, unsigned=unsigned)
    # a None scale_bits / type is an unset one (a None block size is a whole-axis block)
    given = {k: v for k, v in blocks if v is not None or isinstance(k, int)}
    checked = check_block_sizes(given) if given else {}
    axes = [(k, v) for k, v in checked.items() if isinstance(k, int)]
    scale_bits = checked.get("scale_bits")
    dynamic = type_ == "dynamic" or checked.get("type") == "dynamic"
    four_over_six = checked.get("four_over_six", False)
    if four_over_six:
        check_four_over_six(element, SCALE_MODES[scale_bits], num_bits, scale_bits)
    return QuantFormat(
        element,
        SCALE_MODES[scale_bits],
        tuple(axes),
        axis,
        dynamic,
        bool(narrow_range),
        four_over_six,
    )

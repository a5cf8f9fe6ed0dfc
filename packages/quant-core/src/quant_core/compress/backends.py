"""Matmul backends for compressed linears, chosen by weight format and device from one registry.

A backend turns a layer's `QuantizedTensor` into the buffers it keeps (``pack``) and computes
``x @ W.T`` from them (``matmul``). `select_backend` looks up ``(format key, device type)``; every
pair without an entry dequantizes on the fly (`DequantBackend`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

import quant_kernels as qk
from quant_core.compress.formats import WeightFormat

__all__ = ["BACKENDS", "Backend", "DequantBackend", "register_backend", "select_backend"]


class Backend(ABC):
    """Stores a quantized weight in its kernel's layout and multiplies activations by it."""

    name: ClassVar[str] = "base"

    def supports(self, fmt: WeightFormat, weight: torch.Tensor, meta: CodesMeta) -> bool:
        """Whether this backend can hold ``weight`` (shape [out, in]) in format ``fmt``."""
        return True

    @property
    def layout(self) -> str:
        """Names the byte layout of the packed buffers; restore refuses buffers saved in another."""
        return self.name

    @abstractmethod
    def pack(self, qt: qk.QuantizedTensor, meta: CodesMeta) -> dict[str, torch.Tensor]:
        """Buffers (name -> tensor) this backend keeps for the weight."""

    @abstractmethod
    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        """``x @ W.T`` in x's dtype (bias not added)."""


@dataclass(frozen=True)
class CodesMeta:
    """What dequantization needs besides the buffers: the codes' plan, shape and dtype."""

    template: qk.QuantizedTensor  # plan, dtype; its tensors are placeholders (shape only)
    shape: tuple[int, ...]
    input_amax: torch.Tensor | None = None  # static per-tensor E4M3 activation amax, if any
    block: int | None = None  # weight block size along the input axis

    @property
    def padded_in(self) -> int:
        """Input features rounded up to whole blocks (a partial last block is zero-padded)."""
        k = self.shape[1]
        return k if self.block is None else -(-k // self.block) * self.block


def _unpack(codes: torch.Tensor, element: qk.ElementFormat, shape: tuple[int, ...]) -> torch.Tensor:
    if not element.packed_nibbles:
        return codes
    if element.is_int:
        return qk.unpack_int4(codes, signed=not element.unsigned).reshape(shape)
    return qk.unpack_fp4(codes).reshape(shape)  # E2M1, the one 4-bit FP element


def dequantize(buffers: dict[str, torch.Tensor], meta: CodesMeta) -> torch.Tensor:
    """The weight from packed codes and scales through quant-kernels' `dequantize_codes`."""
    t = meta.template
    codes = _unpack(buffers["codes"], t.element, meta.shape)
    qt = replace(t, codes=codes, scale=buffers["scale"], global_scale=buffers.get("global_scale"))
    return qk.dequantize_codes(qt)


class DequantBackend(Backend):
    """Any format, any device: dequantize the packed weight, then ``F.linear``."""

    name = "dequant"

    def pack(self, qt: qk.QuantizedTensor, meta: CodesMeta) -> dict[str, torch.Tensor]:
        out = {"codes": qt.packed_codes(), "scale": qt.scale}
        if qt.global_scale is not None:
            out["global_scale"] = qt.global_scale.reshape(())
        return out

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        return F.linear(x, dequantize(buffers, meta).to(x.dtype))


def unpack_int4pack_cpu(
    packed: torch.Tensor, n: int, k: int, tile: int | None = None
) -> torch.Tensor:
    """Codes ``[n, k]`` (uint8, 0..15) from ``aten._convert_weight_to_int4pack_for_cpu``'s layout.

    torch lays rows out in tiles of ``tile`` rows (this CPU's `int4pack_cpu_tile` by default; the
    last tile holds the remainder): per input column a tile keeps ``tile / 2`` bytes whose low
    nibbles are its first half of rows and high nibbles the second half; a partial tile pairs
    consecutive rows in each byte. Checked against the kernel itself in the tests.
    """
    tile = tile or int4pack_cpu_tile()
    if tile is None:
        raise ValueError(
            "this CPU's int4pack layout is not one quant knows (see int4pack_cpu_tile)"
        )
    flat = packed.reshape(-1)
    full = n // tile * tile
    parts = []
    if full:
        b = flat[: full * k // 2].reshape(full // tile, k, tile // 2)
        parts.append(torch.cat((b & 15, b >> 4), 2).transpose(1, 2).reshape(full, k))
    if n > full:
        b = flat[full * k // 2 :].reshape(k, (n - full) // 2)
        parts.append(torch.stack((b & 15, b >> 4), -1).reshape(k, n - full).t())
    return torch.cat(parts)


@functools.cache
def int4pack_cpu_tile() -> int | None:
    """Rows per tile of ``aten._convert_weight_to_int4pack_for_cpu``'s layout on this machine.

    torch picks the layout by CPU capability (tiles of 64 rows with AVX512, 32 with AVX2), so it is
    found once by packing known codes and reading them back; None when no known layout matches
    (then the int4pack CPU backend is not used and layers dequantize on the fly).
    """
    n, k = 128, 128
    codes = torch.randint(
        0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    for tile in (64, 32, 16):
        if torch.equal(unpack_int4pack_cpu(packed, n, k, tile).to(torch.int32), codes):
            return tile
    return None


class Int4CpuBackend(Backend):
    """Signed INT4 blocks along the input axis on CPU: ``aten._weight_int4pack_mm_for_cpu``.

    The kernel computes ``(q - 8) * scale + zero`` per group; symmetric codes ``c`` map exactly to
    ``q = c + 8`` with ``zero = 0``. Activations: float32, bfloat16, float16. A partial last block
    (SmolLM2's 576 inputs in blocks of 128) is padded with code 0 and zero activations: exact.
    The kernel's time grows with every input row, so inputs of more than ``MAX_ROWS`` rows
    (prefill) dequantize the packed weight and run one dense matmul instead (the crossover is
    measured by ``benchmarks/compress.py``; figures in benchmarks/README.md).
    """

    name = "int4pack_cpu"
    MAX_ROWS = 2
    _mm = staticmethod(lambda *a: torch.ops.aten._weight_int4pack_mm_for_cpu(*a))
    _convert = staticmethod(lambda q: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))

    def supports(self, fmt: WeightFormat, weight: torch.Tensor, meta: CodesMeta) -> bool:
        n = weight.shape[0]
        return (
            fmt.scale_bits is None
            and not fmt.element.unsigned
            and fmt.block in (32, 64, 128, 256)
            and n % 16 == 0  # _convert_weight_to_int4pack_for_cpu needs N divisible by 16
            and self._layout_known()
        )

    @staticmethod
    def _layout_known() -> bool:
        return int4pack_cpu_tile() is not None

    @property
    def layout(self) -> str:
        """The kernel's row tiling differs between CPUs (AVX512: 64, AVX2: 32)."""
        return f"{self.name}/tiles-of-{int4pack_cpu_tile()}-rows"

    def pack(self, qt: qk.QuantizedTensor, meta: CodesMeta) -> dict[str, torch.Tensor]:
        n, k = qt.codes.shape
        scale = qt.scale.reshape(n, -1).float().t()  # [groups, n]
        q = F.pad(qt.codes.to(torch.int32), (0, meta.padded_in - k)) + 8
        sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous()
        return {"codes": self._convert(q.contiguous()), "scale": sz}

    def dequantized_weight(
        self, buffers: dict[str, torch.Tensor], meta: CodesMeta, dtype: torch.dtype
    ) -> torch.Tensor:
        """The ``[out, in]`` weight, ``(q - 8) * scale`` per block, in ``dtype``."""
        (n, k), kp = meta.shape, meta.padded_in
        q = unpack_int4pack_cpu(buffers["codes"], n, kp).to(dtype) - 8
        scale = buffers["scale"][..., 0].t().to(dtype)  # [n, groups]
        return (q.reshape(n, -1, meta.block) * scale[..., None]).reshape(n, kp)[:, :k]

    def _kernel(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        k, kp = meta.shape[1], meta.padded_in
        x2 = x.reshape(-1, k)
        if kp != k:
            x2 = F.pad(x2, (0, kp - k))
        y = self._mm(x2.contiguous(), buffers["codes"], meta.block, buffers["scale"].to(x.dtype))
        return y.reshape(*x.shape[:-1], -1)

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        if x.numel() // meta.shape[1] > self.MAX_ROWS:
            return F.linear(x, self.dequantized_weight(buffers, meta, x.dtype))
        return self._kernel(x, buffers, meta)


class Int4CudaBackend(Int4CpuBackend):
    """Signed INT4 blocks on CUDA: ``aten._weight_int4pack_mm`` (bfloat16 activations)."""

    name = "int4pack_cuda"
    _mm = staticmethod(lambda *a: torch.ops.aten._weight_int4pack_mm(*a))

    @staticmethod
    def _layout_known() -> bool:
        return True

    @property
    def layout(self) -> str:
        return self.name

    @staticmethod
    def _convert(q: torch.Tensor) -> torch.Tensor:
        packed = (q[:, 1::2] | (q[:, 0::2] << 4)).to(torch.uint8)  # high nibble first (CUDA layout)
        return torch.ops.aten._convert_weight_to_int4pack(packed, 8)

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        return self._kernel(x.to(torch.bfloat16), buffers, meta).to(x.dtype)


class Fp8CudaBackend(DequantBackend):
    """Per-tensor FP8 E4M3 weights on CUDA: ``torch._scaled_mm`` with unit activation scale."""

    name = "scaled_mm_cuda"

    def supports(self, fmt: WeightFormat, weight: torch.Tensor, meta: CodesMeta) -> bool:
        return meta.input_amax is not None  # activations already on the per-tensor E4M3 grid

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], meta: CodesMeta
    ) -> torch.Tensor:
        k = meta.shape[1]
        x2 = x.reshape(-1, k)
        xs = meta.input_amax.to(x.device).float().reshape(()) / qk.E4M3_MAX
        xq = (x2.float() / xs).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            xq,
            buffers["codes"].t(),
            scale_a=xs,
            scale_b=buffers["scale"].float().reshape(()),
            out_dtype=torch.bfloat16,
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


BACKENDS: dict[tuple[str, str], Backend] = {}


def register_backend(format_key: str, device_type: str, backend: Backend) -> None:
    """Use ``backend`` for weights of ``format_key`` (e.g. ``"int4/block"``) on ``device_type``."""
    BACKENDS[(format_key, device_type)] = backend


def select_backend(fmt: WeightFormat, weight: torch.Tensor, meta: CodesMeta) -> Backend:
    """The registered backend for ``fmt`` on ``weight``'s device, or `DequantBackend`."""
    backend = BACKENDS.get((fmt.key, weight.device.type))
    if backend is not None and backend.supports(fmt, weight, meta):
        return backend
    return DequantBackend()


register_backend("int4/block", "cpu", Int4CpuBackend())
register_backend("int4/block", "cuda", Int4CudaBackend())
register_backend("e4m3/tensor", "cuda", Fp8CudaBackend())

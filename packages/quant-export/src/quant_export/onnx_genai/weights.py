"""What each Linear of a quantized model becomes in an onnxruntime-genai graph, and what is refused.

A Linear becomes either a float ``MatMul`` (:class:`FloatWeight`, the weight transposed to
``(in, out)``) or a ``com.microsoft::MatMulNBits`` (:class:`NBitsWeight`): our integer codes and
block scales as they are, never re-quantized. MatMulNBits stores unsigned codes with a zero point
that defaults to ``2 ** (bits - 1)`` when the ``zero_points`` input is absent, so quant-core's
symmetric signed codes ``c`` (INT4: -8..7, INT8: -128..127) are stored as ``c + 8`` / ``c + 128``
with no zero-point tensor: ``(stored - 8) * scale == c * scale``, the fake-quant weight exactly.
A per-channel scale is repeated over blocks of 32 (same values, the fast block kernels).

Anything the runtime's graph cannot hold (activation, output or KV-cache quantizers, FP8 / NVFP4 /
MX weights, multi-stage quantizers, unfolded pre-quant scales, rotations) raises
:class:`~quant_export.quantizers.UnsupportedFormatError` (a ValueError) naming the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import quant_kernels as qk
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.quantizers import QuantizerSpec, UnsupportedFormatError, spec_of

__all__ = [
    "FloatWeight",
    "NBitsWeight",
    "check_quantizers",
    "concat_weights",
    "linear_weight",
    "rtn_weight",
]

INT_BITS = (4, 8)  # MatMulNBits' CPU kernels (com.microsoft, onnxruntime >= 1.20)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # block sizes MatMulNBits accepts (powers of two >= 16)
CHANNEL_BLOCK = 32  # the block a per-channel scale is repeated over


@dataclass
class FloatWeight:
    """A float Linear: ``weight_t`` is ``(in, out)`` float32 for ``MatMul``; ``bias`` or None."""

    weight_t: np.ndarray
    bias: np.ndarray | None

    @property
    def key(self) -> tuple:
        """What must agree for two weights to be concatenated along ``out``."""
        return ("float", self.weight_t.shape[0])


@dataclass
class NBitsWeight:
    """A MatMulNBits Linear: packed codes ``(N, blocks, block * bits / 8)`` uint8, scales ``(N, blocks)``."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    k: int
    bias: np.ndarray | None

    @property
    def n(self) -> int:
        """Output features."""
        return int(self.packed.shape[0])

    @property
    def key(self) -> tuple:
        """What must agree for two weights to be concatenated along ``N``."""
        return ("nbits", self.bits, self.block_size, self.k)


Weight = FloatWeight | NBitsWeight


def _refuse(name: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{name}: {why}; the onnx-genai layout holds INT4/INT8 weight-only Linears "
        "(MatMulNBits) and float layers only"
    )


def check_quantizers(model: nn.Module, linears: set[str]) -> None:
    """Raise UnsupportedFormatError naming the first quantizer the runtime cannot hold.

    ``linears`` are the names of the Linears the graph holds; only their weight quantizers may be
    enabled. Any quantizer with a pre-quant scale is refused (quant-core's deployable step folds
    AWQ / SmoothQuant scales into the preceding norm; one left means that fold was impossible).
    """
    from quant_export.quantizers import refuse_compressed

    refuse_compressed(model)
    for name, module in model.named_modules():
        if isinstance(module, SequentialQuantizer):
            if any(q.is_enabled for q in module):
                raise _refuse(name, "multi-stage quantizer (SequentialQuantizer, e.g. W4A8)")
            continue
        if not isinstance(module, TensorQuantizer):
            continue
        if module.pre_quant_scale is not None:
            raise _refuse(
                name,
                "pre_quant_scale left unfolded (AWQ / SmoothQuant scale that "
                "quant_core.make_deployable could not fold into the previous layer)",
            )
        if not module.is_enabled:
            continue
        owner, _, attr = name.rpartition(".")
        if attr == "weight_quantizer" and owner in linears:
            continue
        if attr in ("k_bmm_quantizer", "v_bmm_quantizer"):
            why = (
                "KV-cache quantization: onnxruntime-genai's GroupQueryAttention keeps a float cache"
            )
        elif attr == "input_quantizer":
            why = (
                f"activation quantization ({spec_of(name, module).describe()}): MatMulNBits "
                "quantizes activations itself (accuracy_level) and holds no activation scales"
            )
        else:
            why = (
                f"enabled quantizer ({spec_of(name, module).describe()}) with no form in the graph"
            )
        raise _refuse(name, why)


def _int_weight_format(spec: QuantizerSpec, k: int) -> tuple[int, int] | None:
    """(bits, block size) for a signed integer weight format MatMulNBits holds, else None."""
    fmt = spec.format
    element = fmt.element
    if not element.is_int or fmt.num_bits not in INT_BITS or fmt.unsigned:
        return None
    if fmt.scale_mode is not qk.ScaleMode.FLOAT32 or fmt.dynamic:
        return None
    blocks = {a % 2: b for a, b in spec.blocks.items()}
    if blocks:
        if set(blocks) != {1} or blocks[1] not in BLOCK_SIZES:
            return None
        return fmt.num_bits, blocks[1]
    if fmt.axis in (0, (0,)):
        return fmt.num_bits, CHANNEL_BLOCK
    return None


def _pack(codes: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> tuple:
    """Signed codes (N, K) and scales (N, blocks) -> MatMulNBits' packed uint8 and float32 scales."""
    n, k = codes.shape
    blocks = -(-k // block)
    stored = codes.to(torch.int16) + (1 << (bits - 1))  # the default zero point
    padded = torch.full((n, blocks * block), 1 << (bits - 1), dtype=torch.int16)
    padded[:, :k] = stored
    u = padded.to(torch.uint8).reshape(n, blocks, block)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)  # element 2i in the low nibble
    return u.contiguous().numpy(), scale.float().reshape(n, blocks).contiguous().numpy()


def _bias(module: nn.Module) -> np.ndarray | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float().cpu().numpy()


def linear_weight(name: str, module: nn.Module) -> Weight:
    """The graph form of the Linear ``name`` (float, or its quantizer's codes and scales)."""
    weight = module.weight.detach().float().cpu()
    wq = getattr(module, "weight_quantizer", None)
    if isinstance(wq, SequentialQuantizer) and wq.is_enabled:
        raise _refuse(f"{name}.weight_quantizer", "multi-stage quantizer (e.g. W4A8)")
    if not isinstance(wq, TensorQuantizer) or not wq.is_enabled:
        return FloatWeight(weight.t().contiguous().numpy(), _bias(module))
    spec = spec_of(f"{name}.weight_quantizer", wq)
    n, k = weight.shape
    found = _int_weight_format(spec, k)
    if found is None:
        raise _refuse(
            spec.name,
            f"weight format {spec.describe()} has no MatMulNBits form (signed INT4/INT8, "
            f"blocks {BLOCK_SIZES} along the input axis or per output channel); onnxruntime "
            "has no CPU kernel for FP8 / FP4 weights",
        )
    bits, block = found
    blocks = {a % 2: b for a, b in spec.blocks.items()}
    if blocks and k % block:
        raise _refuse(spec.name, f"input size {k} is not divisible by its block size {block}")
    if spec.amax is None:
        raise _refuse(spec.name, "weight quantizer was never calibrated (amax is None)")
    qt = spec.codes(weight, blocks)
    scale = qt.scale.float().reshape(n, -1)
    if not blocks:  # per channel: one scale per row, repeated over every block of the row
        scale = scale.reshape(n, 1).expand(n, -(-k // block))
    packed, scales = _pack(qt.codes, scale, bits, block)
    return NBitsWeight(packed, scales, bits, block, k, _bias(module))


def rtn_weight(name: str, module: nn.Module, bits: int, block: int) -> NBitsWeight:
    """Round-to-nearest symmetric INT``bits`` blocks of ``module``'s float weight (for an LM head
    that the model holds in float but the user asks to store quantized)."""
    weight = module.weight.detach().float().cpu()
    if weight.shape[1] % block:
        raise _refuse(name, f"input size {weight.shape[1]} is not divisible by block size {block}")
    fmt = qk.QuantFormat.parse(num_bits=bits, block_sizes={-1: block, "type": "static"})
    qt = qk.format_codes(weight, fmt, None, None, {1: block})
    packed, scales = _pack(qt.codes, qt.scale.float().reshape(weight.shape[0], -1), bits, block)
    return NBitsWeight(packed, scales, bits, block, weight.shape[1], _bias(module))


def concat_weights(parts: list[Weight]) -> Weight | None:
    """``parts`` as one Linear with their outputs concatenated (q/k/v), or None if they differ."""
    if len({p.key for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return None
    biases = None if parts[0].bias is None else np.concatenate([p.bias for p in parts])
    if isinstance(parts[0], FloatWeight):
        return FloatWeight(np.concatenate([p.weight_t for p in parts], axis=1), biases)
    first = parts[0]
    return NBitsWeight(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        first.bits,
        first.block_size,
        first.k,
        biases,
    )

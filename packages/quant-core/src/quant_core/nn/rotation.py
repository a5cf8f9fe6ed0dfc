"""The normalized Hadamard rotation ModelOpt's ``rotate`` applies to a quantizer's input (QuaRot/SpinQuant).

``y = x H / sqrt(b)`` along the last axis in blocks of ``b`` (a power of 2), with ``H`` the
Sylvester-ordered Hadamard matrix (``H_2n = [[H_n, H_n], [H_n, -H_n]]``, the order of
``scipy.linalg.hadamard`` and of the ``fast_hadamard_transform`` package ModelOpt calls). The
transform is orthogonal and its own inverse, so rotating both operands of a matmul leaves the
product unchanged while spreading outliers across channels before quantization.
"""

from __future__ import annotations

import torch


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def rotation_block_size(dim: int, block_size: int | None = None) -> int:
    """The block the rotation acts on: ``block_size``, else ``dim`` when it is a power of 2, else the
    largest power-of-2 divisor of ``dim`` (as ModelOpt). ValueError when none fits."""
    size = block_size
    if size is None:
        size = _largest_pow2_divisor(dim)
        if size < 2:
            raise ValueError(
                f"Hadamard rotation: the last dimension {dim} has no power-of-2 divisor >= 2; "
                "set rotate={'enable': True, 'block_size': ...} or use another dimension"
            )
    if size & (size - 1) or size < 1:
        raise ValueError(f"Hadamard rotation: block_size must be a power of 2, got {size}")
    if dim % size:
        raise ValueError(
            f"Hadamard rotation: the last dimension {dim} is not divisible by block_size={size}; "
            f"use a block size dividing it (e.g. {_largest_pow2_divisor(dim)})"
        )
    return size


def normalized_hadamard_transform(
    x: torch.Tensor, rotate_fp32: bool = False, block_size: int | None = None
) -> torch.Tensor:
    """``x`` rotated by the normalized Hadamard matrix along its last axis (blocks of ``block_size``).

    A fast Walsh-Hadamard transform (``log2 b`` butterfly stages). Half-precision inputs are
    computed in float32 and cast back whatever ``rotate_fp32`` says (ModelOpt computes in the input
    dtype unless ``rotate_fp32``); float64 stays float64. Differentiable.
    """
    dim = x.shape[-1]
    size = rotation_block_size(dim, block_size)
    work = x if x.dtype == torch.float64 else x.float()
    y = work.reshape(-1, size)
    h = 1
    while h < size:
        pairs = y.reshape(-1, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, size)
        h *= 2
    y = y * size**-0.5
    return y.reshape(x.shape).to(x.dtype)


__all__ = ["normalized_hadamard_transform", "rotation_block_size"]


def check_paired_key_rotation(model: torch.nn.Module) -> None:
    """ValueError naming the attention whose ``k_bmm_quantizer`` rotates keys while it has no
    ``q_bmm_quantizer`` rotating queries the same way: only both together keep ``q k^T`` (as
    ``NVFP4_KV_ROTATE_CFG`` sets them)."""
    for name, module in model.named_modules():
        key = getattr(module, "k_bmm_quantizer", None)
        attrs = getattr(key, "attribute_config", None)
        if attrs is None or not attrs.rotate_config.enable:
            continue
        query = getattr(module, "q_bmm_quantizer", None)
        query_rotation = getattr(getattr(query, "attribute_config", None), "rotate_config", None)
        if query_rotation != attrs.rotate_config:
            missing = "no q_bmm_quantizer" if query is None else "a q_bmm_quantizer that does not"
            raise ValueError(
                f"attention {name or type(module).__name__} rotates its keys (k_bmm_quantizer "
                f"rotate={attrs.rotate_config}) but has {missing} rotate its queries the same way, "
                "so q k^T would change; rotate '*q_bmm_quantizer' too (NVFP4_KV_ROTATE_CFG does; "
                "quant-llm's Hugging Face and Megatron attentions have a q_bmm_quantizer)"
            )

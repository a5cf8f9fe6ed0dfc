"""The one place compression reads format facts from a weight quantizer."""

from __future__ import annotations

from dataclasses import dataclass

import quant_kernels as qk


@dataclass(frozen=True)
class WeightFormat:
    """Format facts of a weight quantizer that decide its storage and matmul backend."""

    element: qk.ElementFormat
    block: int | None  # block size along the last (input) axis, None when not block-wise
    axis: int | None  # per-channel axis when not block-wise
    scale_bits: tuple[int, int] | None

    @property
    def key(self) -> str:
        """Registry key: element name plus granularity, e.g. ``int4/block``, ``int8/channel``."""
        if self.block is not None:
            gran = "block"
        elif self.axis is not None:
            gran = "channel"
        else:
            gran = "tensor"
        return f"{self.element.name}/{gran}"


def weight_format(quantizer: object) -> WeightFormat:
    """Read ``quantizer``'s element format, last-axis block size, axis and block-scale format."""
    fmt = quantizer.format
    return WeightFormat(
        element=fmt.element,
        block=fmt.block_size,
        axis=None if fmt.blocks else fmt.axis,
        scale_bits=fmt.scale_bits,
    )

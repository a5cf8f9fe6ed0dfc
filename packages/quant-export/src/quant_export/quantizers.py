"""Read quant-core's quantizers for export and mark them in the traced graph.

During export every active ``TensorQuantizer`` is swapped (module swap, restored afterwards) for a
thin wrapper whose forward still runs the quantizer but whose ONNX form is one marker node,
``quant_export::Quantize(index=k)``. The lowering pass then replaces marker ``k`` with the nodes
its :class:`QuantizerSpec` calls for, so the exported pattern never depends on how the fake-quant
arithmetic happens to trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

import quant_kernels as qk
from quant_core.nn import SequentialQuantizer, TensorQuantizer

MARKER_DOMAIN = "quant_export"
MARKER_OP = "Quantize"


class UnsupportedFormatError(ValueError):
    """A quantizer's format has no export form for the requested target."""


@dataclass(frozen=True)
class QuantizerSpec:
    """What export needs from one quantizer: its name, parsed format and calibrated state.

    ``amax`` means what the quantizer's ``_amax`` buffer means (see quant-core's TensorQuantizer):
    per tensor / channel / block for static formats, the global amax for dynamic NVFP4.
    """

    name: str
    enabled: bool
    format: qk.QuantFormat
    amax: torch.Tensor | None
    pre_quant_scale: torch.Tensor | None
    shared_global_amax: torch.Tensor | None = None  # a static NVFP4 quantizer's `global_amax`

    # The format's attributes under the names export code reads.
    num_bits = property(lambda self: self.format.num_bits)
    axis = property(lambda self: self.format.axis)
    scale_bits = property(lambda self: self.format.scale_bits)
    dynamic = property(lambda self: self.format.dynamic)
    unsigned = property(lambda self: self.format.unsigned)
    narrow_range = property(lambda self: self.format.narrow_range)
    element = property(
        lambda self: self.format.element, doc="The element format (int8, e4m3, e2m1, ...)."
    )

    @property
    def blocks(self) -> dict[int, int | None]:
        """``{axis: block size or None}`` (empty when not block-wise)."""
        return self.format.block_axes or {}

    def describe(self) -> str:
        """Short human-readable format, e.g. ``int4 block {-1: 128}`` or ``e2m1 block {-1: 16} scales (4, 3)``."""
        parts = [self.element.name]
        if self.blocks:
            parts.append(f"block {self.blocks}")
        elif self.axis is not None:
            parts.append(f"per-channel axis {self.axis}")
        else:
            parts.append("per-tensor")
        if self.scale_bits:
            parts.append(f"scales {self.scale_bits}")
        parts.append("dynamic" if self.dynamic else "static")
        return " ".join(parts)

    def global_amax(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """NVFP4's per-tensor amax, by the rule quant-core's TensorQuantizer uses (``qk.nvfp4_global_amax``)."""
        if self.shared_global_amax is not None:
            return self.shared_global_amax
        return self.format.global_amax(self.amax, x)

    def codes(self, w: torch.Tensor, blocks: dict[int, int]) -> qk.QuantizedTensor:
        """Integer codes and scales of ``w`` in this format (``blocks``: axis -> block size)."""
        return qk.format_codes(w, self.format, self.amax, self.global_amax(w), blocks)


def spec_of(name: str, quantizer: TensorQuantizer) -> QuantizerSpec:
    """Snapshot the format and buffers of ``quantizer`` (named ``name`` in the model); refuses
    (UnsupportedFormatError) a quantizer export cannot represent (rotation, custom backend)."""
    reason = quantizer.unexportable_reason()
    if reason:
        raise UnsupportedFormatError(f"quantizer {name} cannot be exported: {reason}")
    amax = quantizer.amax
    pqs = quantizer.pre_quant_scale
    shared = quantizer.global_amax
    return QuantizerSpec(
        name=name,
        enabled=quantizer.is_enabled,
        format=quantizer.format,
        amax=None if amax is None else amax.detach().cpu().float().clone(),
        pre_quant_scale=None if pqs is None else pqs.detach().cpu().float().clone(),
        shared_global_amax=None if shared is None else shared.detach().cpu().float().clone(),
    )


def refuse_compressed(model: nn.Module) -> None:
    """Raise UnsupportedFormatError if ``model`` holds `mtq.compress`-ed layers (export reads fake-quant weights)."""
    from quant_core.compress import CompressedLinear

    names = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    if names:
        raise UnsupportedFormatError(
            f"layer {names[0]} (and {len(names) - 1} more) was compressed with mtq.compress; export "
            "reads fake-quant layers: export before mtq.compress, or restore the quantized model "
            "(mtq.restore) and export that"
        )


def active_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """Quantizers that change their input (enabled, or carrying a pre-quant scale), by module name."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SequentialQuantizer):
            if any(q.is_enabled for q in module):
                raise UnsupportedFormatError(
                    f"layer {name}: multi-stage quantizer (SequentialQuantizer, e.g. W4A8) has no ONNX "
                    "export form yet; export it with a single-format config"
                )
            continue
        if isinstance(module, TensorQuantizer) and (
            module.is_enabled or module.pre_quant_scale is not None
        ):
            found.append((name, module))
    return found


class _Marker(torch.autograd.Function):
    """Runs quantizer ``index`` in forward; exports as one ``quant_export::Quantize`` node.

    The tracer only passes tensors and Python scalars to a Function, so the quantizers being
    exported are looked up in ``active`` (filled and emptied by :func:`marked_quantizers`).
    """

    active: ClassVar[dict[int, TensorQuantizer]] = {}

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: int) -> torch.Tensor:
        # The marker is the whole ONNX form, so the quantizer's own ops must not be traced.
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return _Marker.active[index].forward(x).detach()
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g: Any, x: Any, index: int) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, index_i=index)
        out.setType(x.type())
        return out


class _MarkedQuantizer(nn.Module):
    """Stands in for a TensorQuantizer while the model is traced for export."""

    def __init__(self, index: int, quantizer: TensorQuantizer):
        super().__init__()
        self.index = index
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Marker.apply(x, self.index)


@contextlib.contextmanager
def marked_quantizers(model: nn.Module) -> Iterator[list[QuantizerSpec]]:
    """Swap every active quantizer for its marker; yields the specs, indexed by marker ``index``."""
    quantizers = active_quantizers(model)
    modules = dict(model.named_modules())
    swapped: list[tuple[nn.Module, str, TensorQuantizer]] = []
    specs = []
    try:
        for index, (name, quantizer) in enumerate(quantizers):
            parent_name, _, attr = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            specs.append(spec_of(name, quantizer))
            setattr(parent, attr, _MarkedQuantizer(index, quantizer))
            _Marker.active[index] = quantizer
            swapped.append((parent, attr, quantizer))
        yield specs
    finally:
        _Marker.active.clear()
        for parent, attr, quantizer in swapped:
            setattr(parent, attr, quantizer)

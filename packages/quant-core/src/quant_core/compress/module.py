"""`CompressedLinear` and `compress`: quantized linears that keep packed codes and scales."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import quant_kernels as qk
from quant_core.compress.backends import Backend, CodesMeta, select_backend
from quant_core.compress.formats import weight_format
from quant_core.nn import TensorQuantizer
from quant_core.nn.modules import QuantLinear

__all__ = ["CompressedLinear", "compress", "recompress", "weight_codes"]

_E4M3 = qk.ElementFormat.parse((4, 3))


def weight_codes(quantizer: TensorQuantizer, weight: torch.Tensor) -> qk.QuantizedTensor:
    """Codes and scales of ``weight`` exactly as ``quantizer`` fake-quantizes it.

    Static: the calibrated amax. Dynamic block formats (NVFP4, MX): block amaxes from the weight
    itself; NVFP4's global amax as the quantizer uses it (`TensorQuantizer.effective_global_amax`).
    """
    amax = quantizer.amax
    amax = None if amax is None else amax.detach().to(weight.device)
    global_amax = quantizer.effective_global_amax(amax, weight)
    return qk.format_codes(weight, quantizer.format, amax, global_amax)


def _static_input_amax(quantizer: TensorQuantizer) -> torch.Tensor | None:
    """The per-tensor amax of a static E4M3 activation quantizer (else None)."""
    on = quantizer.is_enabled and not quantizer.is_dynamic and quantizer.amax is not None
    if (
        on
        and quantizer.format.element == _E4M3
        and not quantizer.block_sizes
        and quantizer.axis is None
    ):
        return quantizer.amax.detach().reshape(())
    return None


class CompressedLinear(nn.Module):
    """A linear layer whose weight is stored as packed codes + scales in its backend's layout.

    The input and output quantizers of the source `QuantLinear` are kept and still run.
    """

    def __init__(self, source: QuantLinear):
        super().__init__()
        wq = source.weight_quantizer
        fmt = weight_format(wq)
        weight = source.weight.detach()
        qt = weight_codes(wq, weight)
        template = qk.QuantizedTensor(qt.codes[:0], qt.scale[:0], None, qt.plan, qt.dtype)
        self.meta = CodesMeta(
            template, tuple(weight.shape), _static_input_amax(source.input_quantizer), fmt.block
        )
        self.backend: Backend = select_backend(fmt, weight, self.meta)
        self.format_key = fmt.key
        self.source = {  # what save/restore needs to rebuild this layer from a fresh model
            "original": source._quant_original_key,
            "quantized": f"{type(source).__module__}.{type(source).__qualname__}",
            "compressed": {  # the weight quantizer as save_restore records every quantizer
                "weight_quantizer": {
                    "attributes": wq.attribute_config.to_json_dict(),
                    "enabled": True,
                    "tensors": {k: list(v.shape) for k, v in wq.named_buffers(recurse=False)},
                },
                "backend": self.backend.name,
                "layout": self.backend.layout,
                "weight_shape": list(weight.shape),
            },
        }
        self.in_features, self.out_features = source.in_features, source.out_features
        for key, value in self.backend.pack(qt, self.meta).items():
            self.register_buffer(key, value.contiguous())
        self.bias = source.bias
        self.input_quantizer = source.input_quantizer
        self.output_quantizer = source.output_quantizer

    def _apply(self, fn: Any, recurse: bool = True) -> CompressedLinear:
        """``.to()`` / ``.half()`` / ``.cuda()`` as for any module, except that 8-bit float codes
        keep their dtype (a dtype cast would turn codes into values); scales follow the cast."""
        codes = {
            k: v.dtype
            for k, v in self._buffers.items()
            if v is not None and v.is_floating_point() and v.element_size() == 1
        }
        super()._apply(fn, recurse)
        for key, dtype in codes.items():
            if self._buffers[key].dtype != dtype:
                self._buffers[key] = self._buffers[key].to(dtype)
        return self

    def _packed(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Quantize the input as before, multiply by the compressed weight, add the bias."""
        x = self.input_quantizer(input)
        y = self.backend.matmul(x, self._packed(), self.meta)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return self.output_quantizer(y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format_key}, backend={self.backend.name}"
        )


def _check(name: str, module: QuantLinear) -> None:
    wq = module.weight_quantizer
    if not isinstance(wq, TensorQuantizer):
        raise ValueError(
            f"layer {name}: compress supports a single weight quantizer, got {type(wq).__name__}"
        )
    for role in ("weight_quantizer", "input_quantizer"):
        reason = getattr(module, role).unexportable_reason()
        if reason:
            raise ValueError(f"layer {name}: cannot compress: {role} {reason}")
    if wq.is_dynamic and not wq.format.block_axes:
        raise ValueError(
            f"layer {name}: dynamic per-tensor/per-channel weight quantizer; compress needs a calibrated "
            "static weight format or a block format (INT8_DEFAULT_CFG, INT4_BLOCKWISE_WEIGHT_ONLY_CFG, "
            "NVFP4_DEFAULT_CFG, MXFP8_DEFAULT_CFG, ...)"
        )
    if not wq.is_dynamic and wq.amax is None:
        raise ValueError(
            f"layer {name}: weight quantizer is not calibrated; run mtq.calibrate/quantize with a forward_loop first"
        )
    if wq.pre_quant_scale is not None:
        raise ValueError(
            f"layer {name}: weight pre_quant_scale is not supported by compress; quantize without weight smoothing to compress"
        )
    if wq.format.element.bits <= 4 and module.weight.shape[-1] % 2:
        raise ValueError(
            f"layer {name}: {wq.format.element.name} codes are packed two per byte along the input, "
            f"which needs an even input size, got {module.weight.shape[-1]}; leave this layer "
            "unquantized (or uncompressed)"
        )


def compress(model: nn.Module, config: dict[str, Any] | None = None) -> nn.Module:
    """Replace every calibrated quantized linear with an enabled weight quantizer by a `CompressedLinear`.

    ``config`` (ModelOpt's signature) is accepted and must be None: every eligible layer is
    compressed. Refuses (ValueError naming the layer) uncalibrated or dynamic weight quantizers.
    Returns ``model``, changed in place.
    """
    if config is not None:
        raise ValueError(
            f"compress config={config!r} is not supported yet; pass None to compress every quantized linear"
        )
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer.is_enabled
    ]
    for name, m in targets:
        _check(name, m)
    modules = dict(model.named_modules())
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        with torch.no_grad():
            setattr(parent, attr, CompressedLinear(m))
    return model


def recompress(module: QuantLinear, name: str, record: dict) -> CompressedLinear:
    """A `CompressedLinear` built from ``module`` (its weight quantizer restored with placeholder
    tensors), whose packed buffers restore then overwrites; refuses a backend or packed layout
    other than the saved one (``record``: the layer's saved ``compressed`` entry)."""
    with torch.no_grad():
        layer = CompressedLinear(module)
    backend, layout = record["backend"], record.get("layout", record["backend"])
    if layer.backend.name != backend:
        raise ValueError(
            f"layer {name} was saved compressed for backend {backend!r}, but on "
            f"{module.weight.device.type} it would use {layer.backend.name!r}, whose packed layout "
            f"differs; restore onto a model on the device it was saved from"
        )
    if layer.backend.layout != layout:
        raise ValueError(
            f"layer {name} was saved with packed layout {layout!r}, but this machine's "
            f"{backend!r} kernel uses {layer.backend.layout!r}; restore the uncompressed "
            f"quantized model here and call mtq.compress on this machine"
        )
    return layer

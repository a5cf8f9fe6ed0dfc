"""ONNX form of INT8 and FP8 quantizers under a plain ``torch.onnx.export`` of a quantized model.

Who decides a quantizer's ONNX form: quant-export's ``export_onnx`` swaps every quantizer for a
marker and lowers the markers itself (``quant_export.lowering``); its markers run the quantizer
untraced, and this module then stays out of the way (`wants_qdq` is False when the quantizer is
not being traced). This module decides only when the exporter traces the quantizer itself, that
is a plain ``torch.onnx.export``. Both write a static scale as `qdq_scale`.

While ``torch.onnx.export`` (dynamo or legacy exporter) traces a static quantizer with a Q/DQ form,
the quantizer emits an op the exporter maps to QuantizeLinear + DequantizeLinear:

* INT8 (signed full range, or unsigned) per tensor or per channel: torch's
  ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``, which both
  exporters translate to Q/DQ.
* FP8 E4M3 per tensor: the custom op ``quant_core::fp8_qdq``, with an ONNX translation
  registered in onnxscript's torchlib registry (dynamo exporter) and an autograd ``symbolic``
  (legacy exporter). The translation is registered when an FP8 quantizer is configured and
  onnxscript is installed; quant-core itself never needs onnx.

Other formats export as the arithmetic of their reference op.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

import quant_kernels as qk

_E4M3 = qk.ElementFormat.parse((4, 3))


@torch.library.custom_op("quant_core::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 quantize-dequantize of x with a per-tensor scale (amax = E4M3_MAX * scale)."""
    return qk.fake_quantize(x, num_bits=(4, 3), amax=(scale * qk.E4M3_MAX).to(x.device))


@fp8_qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


_registered = False


def register_onnx_translation() -> None:
    """Teach the dynamo ONNX exporter (via onnxscript's torchlib registry) to emit FP8 Q/DQ."""
    global _registered
    if _registered or importlib.util.find_spec("onnxscript") is None:
        return
    _registered = True
    from onnxscript import ir
    from onnxscript.function_libs.torch_lib.registration import torch_op
    from onnxscript.onnx_opset import opset19 as op

    @torch_op("quant_core::fp8_qdq", trace_only=True)
    def quant_core_fp8_qdq(x: Any, scale: Any) -> Any:
        zero_point = op.Constant(value=ir.tensor(0.0, dtype=ir.DataType.FLOAT8E4M3FN))
        scale = op.CastLike(scale, x)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)


class _LegacyFP8QDQ(torch.autograd.Function):
    """FP8 Q/DQ for the legacy TorchScript exporter (needs opset_version >= 19)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # torch's float8 cast rounds to nearest even; the clamp saturates (as QuantizeLinear does).
        q = (x / scale).clamp(-qk.E4M3_MAX, qk.E4M3_MAX).to(torch.float8_e4m3fn)
        return (q.to(x.dtype) * scale).to(x.dtype)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any) -> Any:
        zero_point = g.op("Constant", value_t=torch.zeros((), dtype=torch.float8_e4m3fn))
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


def has_qdq_form(fmt: qk.QuantFormat) -> bool:
    """True for static formats with a standard Q/DQ form: INT8 (signed full range or unsigned) per
    tensor or per channel, FP8 E4M3 per tensor."""
    if fmt.dynamic or fmt.blocks or fmt.scale_mode is not qk.ScaleMode.FLOAT32:
        return False
    element = fmt.element
    if element.is_int:
        full_range = element.unsigned or not fmt.narrow_range
        return element.bits == 8 and full_range and (fmt.axis is None or isinstance(fmt.axis, int))
    return element == _E4M3 and fmt.axis is None


def wants_qdq(quantizer: Any) -> bool:
    """True while ``torch.onnx.export`` traces this quantizer and it has a standard Q/DQ form."""
    if not torch.onnx.is_in_onnx_export():
        return False
    if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return False  # run untraced (quant-export's markers): the exporter never sees these ops
    attrs = quantizer.attribute_config
    if attrs.learn_amax or attrs.bias is not None:
        return False
    return has_qdq_form(quantizer.format)


def check_traceable(quantizer: Any) -> None:
    """Refuse, by name, a quantizer that a plain ``torch.onnx.export`` cannot trace.

    Floating-point elements without a Q/DQ form (NVFP4, MXFP*, FP8 per channel or per token) and
    block scales stored as E4M3 / E8M0 (NVFP4, MX) compute with float8 casts that neither ONNX
    exporter translates; without this the export fails deep inside the exporter with a message
    that names neither the quantizer nor the format. Integer formats with float32 scales export
    as their arithmetic and pass. quant-export's ``export_onnx`` (which lowers such formats to
    TensorRT's ops) runs quantizers untraced and is not affected.
    """
    if not torch.onnx.is_in_onnx_export():
        return
    if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return
    fmt = quantizer.format
    if has_qdq_form(fmt) and not fmt.dynamic:
        return
    if fmt.element.is_int and fmt.scale_mode is qk.ScaleMode.FLOAT32:
        return
    name = getattr(quantizer, "_name", None) or "(unnamed quantizer)"
    raise ValueError(
        f"torch.onnx.export cannot trace quantizer {name} ({fmt.label}): only static INT8 "
        "and per-tensor FP8 E4M3 have a standard QuantizeLinear/DequantizeLinear form, and this "
        "format's float8 arithmetic has no ONNX translation. Export with quant_export.export_onnx("
        "model, args, path, target='tensorrt') (TensorRT's FP4/MX/FP8 ops), or quantize it with an "
        "INT8 / FP8 per-tensor config for a plain export"
    )


def qdq_scale(amax: torch.Tensor, element: qk.ElementFormat) -> torch.Tensor:
    """The scale of a static QuantizeLinear/DequantizeLinear: ``amax / element max``, and 1 where
    amax is 0 (the quantizer's output there is 0 either way)."""
    return torch.where(amax > 0, amax / element.max_value, torch.ones_like(amax))


def qdq(x: torch.Tensor, amax: torch.Tensor, quantizer: Any) -> torch.Tensor:
    """Quantize-dequantize x with ops that export as QuantizeLinear/DequantizeLinear."""
    fmt = quantizer.format
    scale = qdq_scale(amax.detach().float().to(x.device), fmt.element)
    if not fmt.element.is_int:
        scale = scale.reshape(())
        if torch.compiler.is_exporting():
            return fp8_qdq(x, scale)
        return _LegacyFP8QDQ.apply(x, scale)
    qmin, qmax = fmt.element.int_range()
    if fmt.axis is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point, qmin, qmax)
    scale = scale.reshape(-1)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_channel_affine(
        x, scale, zero_point, fmt.axis % x.dim(), qmin, qmax
    )

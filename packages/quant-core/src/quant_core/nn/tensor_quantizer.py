"""TensorQuantizer: an ``nn.Module`` mapping a tensor to its quantized-dequantized value.

Its attributes follow ModelOpt's ``QuantizerAttributeConfig``; setting them parses the format
once into a `quant_kernels.QuantFormat` (`TensorQuantizer.format`), which everything else reads.
Its state is the buffers ``_amax`` and ``_pre_quant_scale`` (``_amax`` becomes a parameter with
``learn_amax``), so it travels with ``state_dict``. What ``_amax`` holds depends on the format:

* static quantizers: the calibrated amax per tensor (0-d), per channel (keepdim, broadcastable
  to the input) or per block (``ceil(d_i / b_i)`` per dimension, as ``quant_kernels.reduce_amax``);
  NVFP4's global amax is then the largest block amax (``quant_kernels.nvfp4_global_amax``)
  unless the buffer ``_global_amax`` overrides it (`global_amax`: layers fused by engines share one);
* dynamic NVFP4 (two-level scales): the calibrated *global* amax (0-d); block amaxes come from
  each input;
* other dynamic quantizers: nothing (amax comes from each input).

All numerics go through ``quant_kernels.fake_quantize``; gradients pass straight through, unchanged
everywhere by default (``pass_through_bwd=True``, as in ModelOpt) or zero where the value
saturated (``pass_through_bwd=False``). A static quantizer that was never calibrated warns once, naming its
module, and falls back to the amax of the tensor it sees.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

import quant_kernels as qk
from quant_core.calib import Calibrator, MaxCalibrator, make_calibrator, reduce_amax
from quant_core.config.schema import QuantizerAttributeConfig, parse_attributes
from quant_core.nn import onnx_qdq
from quant_core.nn.describe import describe_quantizer
from quant_core.nn.lsq import LSQState, disable_lsq, enable_lsq, learnable_set, lsq_forward
from quant_core.nn.quant_backends import get_quant_backend
from quant_core.nn.quantizer_api import ModelOptQuantizerAPI, merge_attribute_update
from quant_core.nn.shape_checks import check_amax_shape, check_pre_quant_scale


def _check_amax(value: torch.Tensor, name: str) -> None:
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(
            f"amax of quantizer {name or '(unnamed)'} must be finite and >= 0, got {value}"
        )


class TensorQuantizer(ModelOptQuantizerAPI, nn.Module):
    """Fake-quantizes tensors with the format in its attributes (ModelOpt's TensorQuantizer API)."""

    def __init__(
        self,
        quant_attribute_cfg: QuantizerAttributeConfig | dict[str, Any] | None = None,
        if_quant: bool = True,
        if_calib: bool = False,
        amax: torch.Tensor | float | None = None,
    ):
        super().__init__()
        self._name = ""
        self._if_quant = if_quant
        self._if_calib = if_calib
        self._warned_uncalibrated = False
        self._attrs = QuantizerAttributeConfig()
        self._calibrator: Calibrator = MaxCalibrator()
        self._global_calibrator: MaxCalibrator | None = None
        self._disabled = False
        self._lsq_state: LSQState | None = None
        # scratch space a custom backend may keep on the quantizer (``TensorQuantizerCache``);
        # never saved, so a restored quantizer starts without one
        self._quantizer_cache: Any = None
        self.set_from_attribute_config(quant_attribute_cfg or QuantizerAttributeConfig())
        if amax is not None:
            self.amax = amax

    # ----- attributes -------------------------------------------------------------------
    def set_from_attribute_config(self, cfg: QuantizerAttributeConfig | dict[str, Any]) -> None:
        """Set attributes from a config; a dict updates only the keys it names."""
        if isinstance(cfg, dict):
            cfg = parse_attributes(
                merge_attribute_update(self._attrs, cfg), f" for {self._name or 'quantizer'}"
            )
        old = self._attrs
        fields = ("num_bits", "axis", "block_sizes", "type", "constant_amax", "use_constant_amax")
        if any(getattr(old, f) != getattr(cfg, f) for f in fields):
            self.amax = None  # a calibrated amax belongs to the old format and granularity
            disable_lsq(self)
        self._attrs = cfg
        self._rotation = cfg.rotate_config  # read on every forward: parsed once here
        if self.has_constant_amax:
            self.amax = cfg.constant_amax or qk.E4M3_MAX
        self._format = fmt = cfg.quant_format()
        self._disabled = not cfg.enable
        self._calibrator = make_calibrator(cfg, fmt.block_axes)
        needs_global = fmt.dynamic and fmt.has_global_amax
        self._global_calibrator = MaxCalibrator() if needs_global else None
        if not fmt.element.is_int and onnx_qdq.has_qdq_form(fmt):  # FP8 needs a translation
            onnx_qdq.register_onnx_translation()
        self._apply_learn_amax()

    @property
    def format(self) -> qk.QuantFormat:
        """The quantizer's format, parsed once from its attributes (names its ``qk.FORMATS`` row)."""
        return self._format

    @property
    def attribute_config(self) -> QuantizerAttributeConfig:
        """The validated attributes of this quantizer."""
        return self._attrs

    def _set_attr(self, **update: Any) -> None:
        self.set_from_attribute_config(update)

    num_bits = property(
        lambda self: self._attrs.num_bits, lambda self, v: self._set_attr(num_bits=v)
    )
    axis = property(lambda self: self._attrs.axis, lambda self, v: self._set_attr(axis=v))
    block_sizes = property(
        lambda self: self._attrs.block_sizes, lambda self, v: self._set_attr(block_sizes=v)
    )
    unsigned = property(
        lambda self: self._attrs.unsigned, lambda self, v: self._set_attr(unsigned=v)
    )
    narrow_range = property(
        lambda self: self._attrs.narrow_range, lambda self, v: self._set_attr(narrow_range=v)
    )
    fake_quant = property(
        lambda self: self._attrs.fake_quant, lambda self, v: self._set_attr(fake_quant=v)
    )
    learn_amax = property(
        lambda self: self._attrs.learn_amax, lambda self, v: self._set_attr(learn_amax=v)
    )
    trt_high_precision_dtype = property(
        lambda self: self._attrs.trt_high_precision_dtype,
        lambda self, v: self._set_attr(trt_high_precision_dtype=v),
    )
    pass_through_bwd = property(
        lambda self: self._attrs.pass_through_bwd,
        lambda self, v: self._set_attr(pass_through_bwd=v),
    )
    # ModelOpt's own attribute names (its tests and scripts assign them): the same validated setters
    _num_bits, _block_sizes, _axis = num_bits, block_sizes, axis
    _unsigned, _narrow_range, _pass_through_bwd = unsigned, narrow_range, pass_through_bwd
    _fake_quant = fake_quant

    @property
    def is_dynamic(self) -> bool:
        """True when amax comes from each input (no calibration needed)."""
        return self._attrs.is_dynamic

    @property
    def _dynamic(self) -> bool:
        """True when the attribute ``type`` is ``"dynamic"`` (ModelOpt's name; block types aside)."""
        return self._attrs.type == "dynamic"

    # ModelOpt's names for the pinned-amax attributes
    _constant_amax = property(lambda self: self._attrs.constant_amax)
    _use_constant_amax = property(lambda self: self._attrs.use_constant_amax)

    @property
    def is_mx_format(self) -> bool:
        """True for the OCP MX formats (block scales in E8M0, no per-tensor amax)."""
        return self._format.scale_mode is qk.ScaleMode.E8M0

    @property
    def scale_bits(self) -> tuple[int, int] | None:
        """Format of the block scales: (4, 3) for NVFP4, (8, 0) for MX, None for fp32."""
        return self._format.scale_bits

    @property
    def calibrator(self) -> Calibrator:
        """The calibrator collecting statistics for this quantizer."""
        return self._calibrator

    # ----- enable / calibration switches --------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        """Whether the quantizer acts on its input."""
        return not self._disabled

    def enable(self) -> None:
        """Turn the quantizer on."""
        self._disabled = False
        self._attrs = self._attrs.model_copy(update={"enable": True})

    def disable(self) -> None:
        """Turn the quantizer off (inputs pass through, except the pre-quant scale)."""
        self._disabled = True
        self._attrs = self._attrs.model_copy(update={"enable": False})

    def enable_quant(self) -> None:
        """Quantize in forward."""
        self._if_quant = True

    def disable_quant(self) -> None:
        """Pass inputs through unquantized in forward (used while collecting statistics)."""
        self._if_quant = False

    def enable_calib(self) -> None:
        """Collect calibration statistics in forward."""
        self._if_calib = True

    def disable_calib(self) -> None:
        """Stop collecting calibration statistics."""
        self._if_calib = False

    # ----- state: amax, pre-quant scale ----------------------------------------------------
    @property
    def amax(self) -> torch.Tensor | None:
        """The calibrated amax (per tensor, channel or block), or None when not set."""
        return self._parameters.get("_amax", self._buffers.get("_amax"))

    @amax.setter
    def amax(self, value: torch.Tensor | float | None) -> None:
        self._buffers.pop("_global_amax", None)  # a shared global amax belongs to the old amax
        if value is None:
            self._buffers.pop("_amax", None)
            self._parameters.pop("_amax", None)
            return
        value = torch.as_tensor(value).detach().float().clone()
        _check_amax(value, self._name)
        if value.numel() > 1:  # (a constant amax is set before the format is parsed)
            check_amax_shape(value, self._attrs.axis, self._format, self._name)
        current = self.amax
        if current is not None and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value.to(current.device))
            return
        self._buffers.pop("_amax", None)
        self._parameters.pop("_amax", None)
        self.register_buffer("_amax", value)
        self._apply_learn_amax()

    @property
    def global_amax(self) -> torch.Tensor | None:
        """A static NVFP4 quantizer's shared global amax (0-d), or None: then the global amax is
        the format's rule (the largest block amax). Export sets it so that layers an engine fuses
        (q/k/v, gate/up) share one global scale; setting ``amax`` clears it."""
        return self._buffers.get("_global_amax")

    @global_amax.setter
    def global_amax(self, value: torch.Tensor | float | None) -> None:
        if value is None:
            self._buffers.pop("_global_amax", None)
            return
        fmt, amax = self._format, self.amax
        if fmt.dynamic or not fmt.has_global_amax or amax is None:
            raise ValueError(
                f"quantizer {self._name or '(unnamed)'}: global_amax is for calibrated static "
                f"NVFP4 quantizers; this one is {fmt.label}"
                + ("" if amax is not None else " without an amax")
            )
        value = torch.as_tensor(value).detach().float().reshape(()).clone()
        _check_amax(value, self._name)
        if value < amax.max():
            raise ValueError(
                f"quantizer {self._name or '(unnamed)'}: global_amax {value.item():.6g} is below "
                f"its largest block amax {amax.max().item():.6g}"
            )
        self.register_buffer("_global_amax", value.to(amax.device))

    def effective_global_amax(
        self, amax: torch.Tensor | None, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The NVFP4 global amax this quantizer quantizes with when it holds ``amax``: `global_amax`
        when set, else the format's rule (`qk.QuantFormat.global_amax`); None for other formats."""
        shared = self._buffers.get("_global_amax")
        return self._format.global_amax(amax, x) if shared is None else shared

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # forward trusts the stored amax (no per-call check, which would wait for the device)
        value = state_dict.get(prefix + "_amax")
        if value is not None:
            _check_amax(value, self._name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_amax(self) -> None:
        """Drop amax (and LSQ's learned amaxes) and any statistics collected."""
        self.amax = None
        disable_lsq(self)
        self.reset_statistics()

    # ----- learned step size (ModelOpt's lsq; see quant_core.nn.lsq) -------------------------
    def enable_lsq(
        self,
        quantize_scales: bool | None = None,
        learnable_amax: list[str] | str = ("post",),
        tied_amax: bool = False,
        quantize_pre_scale: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Learn the block amaxes: pre (quantize) and post (dequantize) start from the calibrated
        amax, held in ``dtype``; ``quantize_scales`` (default: NVFP4) rounds the block scales to
        E4M3."""
        learn = learnable_set(learnable_amax)
        if tied_amax and learn not in ((), ("post", "pre")):
            raise ValueError(
                f"tied_amax=True needs learnable_amax [] or ['pre', 'post'], got {learnable_amax!r}"
            )
        rounded = self._format.has_global_amax if quantize_scales is None else quantize_scales
        enable_lsq(self, LSQState(learn, tied_amax, bool(rounded), quantize_pre_scale), dtype=dtype)

    @property
    def lsq_state(self) -> LSQState | None:
        """The LSQ settings when the quantizer learns its block amaxes, else None."""
        return self._lsq_state

    # ModelOpt's names for the LSQ settings
    _lsq = property(lambda self: self._lsq_state is not None, doc="True in LSQ mode.")
    _tied_amax = property(lambda self: bool(self._lsq_state and self._lsq_state.tied_amax))
    _quantize_scales = property(
        lambda self: bool(self._lsq_state and self._lsq_state.quantize_scales)
    )
    _quantize_pre_scale = property(
        lambda self: bool(self._lsq_state and self._lsq_state.quantize_pre_scale)
    )

    @property
    def amax_pre(self) -> torch.Tensor | None:
        """LSQ's quantization amax (the post amax when tied), None outside LSQ mode."""
        if self._lsq_state is None:
            return None
        return self._amax_post if self._lsq_state.tied_amax else self._amax_pre

    @property
    def amax_post(self) -> torch.Tensor | None:
        """LSQ's dequantization amax, None outside LSQ mode."""
        return None if self._lsq_state is None else self._amax_post

    def reset_statistics(self) -> None:
        """Drop the statistics collected so far (amax stays until `load_calib_amax`)."""
        self._calibrator.reset()
        if self._global_calibrator is not None:
            self._global_calibrator.reset()

    def _apply_learn_amax(self) -> None:
        amax = self.amax
        if amax is None:
            return
        if self._attrs.learn_amax and "_amax" in self._buffers:
            del self._buffers["_amax"]
            self.register_parameter("_amax", nn.Parameter(amax.clone()))
        elif not self._attrs.learn_amax and "_amax" in self._parameters:
            del self._parameters["_amax"]
            self.register_buffer("_amax", amax.detach().clone())

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        """Per-channel scale multiplied into the input before quantization (SmoothQuant, AWQ)."""
        return self._buffers.get("_pre_quant_scale")

    @pre_quant_scale.setter
    def pre_quant_scale(self, value: torch.Tensor | None) -> None:
        if value is None:
            self._buffers.pop("_pre_quant_scale", None)
            return
        value = torch.as_tensor(value).detach().float().clone()
        if not torch.isfinite(value).all():
            raise ValueError(f"pre_quant_scale of {self._name or 'quantizer'} must be finite")
        self._buffers.pop("_pre_quant_scale", None)
        self.register_buffer("_pre_quant_scale", value)

    # ----- calibration ----------------------------------------------------------------------
    def collect(self, x: torch.Tensor) -> None:
        """Feed one tensor to this quantizer's calibrator(s) (none for a constant amax)."""
        if self.has_constant_amax:
            return
        if self._global_calibrator is not None:
            self._global_calibrator.collect(x)
        if not self.is_dynamic:
            self._calibrator.collect(x)

    def load_calib_amax(self, *args: Any, strict: bool = False, **kwargs: Any) -> None:
        """Set amax from the statistics collected; ``*args, **kwargs`` go to the calibrator's
        ``compute_amax`` (e.g. ``method="percentile", percentile=99.9`` for a histogram).

        Nothing collected leaves amax unchanged, or raises with ``strict=True``.
        """
        source = self._global_calibrator if self.is_dynamic else self._calibrator
        if source is None or self.has_constant_amax:
            return
        amax = source.compute_amax(*args, **kwargs)
        if amax is None and strict:
            raise RuntimeError(f"calibrator of {self._name or 'quantizer'} has seen no tensor")
        if amax is not None:
            self.amax = amax.to(self.amax.device) if self.amax is not None else amax
        source.reset()

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Max-calibrate on ``x`` alone: drop earlier statistics, collect ``x``, load its amax."""
        self.reset_statistics()
        self.collect(x)
        self.load_calib_amax()

    # ----- forward ----------------------------------------------------------------------------
    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized and dequantized in this quantizer's format and amax: no pre-quant scale,
        bias or statistics, whatever the enable / calibration switches say."""
        return self._quantize(x)

    _fake_quantize = fake_quantize  # ModelOpt's name

    def _warn_uncalibrated(self) -> None:
        if not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            warnings.warn(
                f"quantizer {self._name or f'(unnamed, id {id(self):#x})'} is static but was never calibrated; it uses "
                "the amax of each input it sees (dynamic) until it is calibrated",
                RuntimeWarning,
                stacklevel=3,
            )

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        attrs = self._attrs
        if attrs.backend is not None:
            return get_quant_backend(attrs.backend)(x, self)
        if x.dtype == torch.float64:
            raise ValueError(
                f"quantizer {self._name or '(unnamed)'} got a float64 input: quant fake-quantizes "
                "float32, float16 and bfloat16 tensors only; cast the model and its inputs, e.g. "
                "model.float()"
            )
        if self._lsq_state is not None:
            return lsq_forward(self, x)
        amax = self.amax
        if not self.is_dynamic and amax is not None and onnx_qdq.wants_qdq(self):
            return onnx_qdq.qdq(x, amax, self)
        onnx_qdq.check_traceable(self)
        x_in = x
        fmt = self._format
        blocks = fmt.block_axes
        if self.is_dynamic:
            # per-tensor and per-block amaxes (and NVFP4's global one) are taken by the kernels
            amax_arg = None if blocks or attrs.axis is None else reduce_amax(x_in, axis=attrs.axis)
            global_amax = self.effective_global_amax(amax)
        else:
            if amax is None:
                self._warn_uncalibrated()
                amax = reduce_amax(x_in, axis=attrs.axis, block_sizes=blocks)
            amax_arg = amax.to(x.device)
            global_amax = self.effective_global_amax(amax_arg)
        if attrs.learn_amax and amax_arg is not None and amax_arg.requires_grad:
            # LSQ-style: fq(x; amax) = amax * fq(x / amax; 1), so amax gets the gradient of its scale.
            bound = amax_arg.to(x_in.dtype)
            unit = qk.fake_quantize(
                x_in / bound,
                num_bits=attrs.num_bits,
                amax=torch.ones_like(bound.detach()),
                unsigned=attrs.unsigned,
                narrow_range=attrs.narrow_range,
                validate_amax=False,
            )
            return unit * bound
        return qk.fake_quantize_format(
            x_in,
            fmt,
            amax=amax_arg.detach() if amax_arg is not None else None,
            global_amax=global_amax.detach().to(x.device) if global_amax is not None else None,
            validate_amax=False,  # checked when set (amax setter, state dict), or taken from x
            pass_through_bwd=attrs.pass_through_bwd,
        )

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        cfg = self._attrs.bias
        if cfg is None:
            return None
        axes = [a % x.dim() for a in cfg if isinstance(a, int)]
        stored = self._buffers.get("_bias_value")
        if cfg.get("type", "static") == "static" and stored is not None and not self._if_calib:
            return stored.to(x.dtype)
        if cfg.get("method", "mean") == "max_min":
            bias = (
                x.detach().amax(dim=axes, keepdim=True) + x.detach().amin(dim=axes, keepdim=True)
            ) / 2
        else:
            bias = x.detach().mean(dim=axes, keepdim=True)
        if cfg.get("type", "static") == "static" and self._if_calib:
            # Static bias: the mean over the calibration batches of each batch's bias.
            count = self._buffers.get("_bias_count")
            if stored is None or count is None or stored.shape != bias.shape:
                self.register_buffer("_bias_value", bias.float().clone())
                self.register_buffer("_bias_count", torch.ones((), device=x.device))
            else:
                stored.mul_(count / (count + 1)).add_(bias.float() / (count + 1))
                count.add_(1)
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pre-quant scale, collect statistics when calibrating, and fake-quantize."""
        pqs = self.pre_quant_scale
        if pqs is not None:
            check_pre_quant_scale(pqs, x, self._name)
            x = x * pqs.to(x.dtype)
        rotate = self._rotation
        if rotate.enable:  # also when disabled, so a rotated pair of operands stays consistent
            x = self._rotate(x)
        if self._disabled:
            return self._rotate(x) if rotate.enable and rotate.mode == "rotate_back" else x
        bias = self._bias(x)
        if bias is not None:
            x = x - bias
        if self._if_calib:
            self.collect(x)
        if self._if_quant:
            x = self._quantize(x)
        x = x + bias if bias is not None else x
        return self._rotate(x) if rotate.enable and rotate.mode == "rotate_back" else x

    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        fmt, gran, amax = describe_quantizer(self)
        return f"{fmt}, {gran}, amax={amax}"

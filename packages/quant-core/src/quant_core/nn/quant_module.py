"""Quantized module bases: quantizers around an original module's forward, created by ``_setup``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from quant_core.config.schema import QuantizerAttributeConfig
from quant_core.nn.tensor_quantizer import TensorQuantizer

INPUT_DEFAULT = QuantizerAttributeConfig(num_bits=8, axis=None)
WEIGHT_DEFAULT = QuantizerAttributeConfig(num_bits=8, axis=0)


class QuantModule(nn.Module):
    """Base of the quantized modules; ``_setup`` creates the quantizers after in-place conversion.

    Built directly (``QuantLinear(8, 8)``), a quantized module takes its original class's
    arguments plus ModelOpt's ``quant_desc_input`` / ``quant_desc_weight`` / ``quant_desc_output``
    (attribute configs or dicts for those quantizers) and is set up at once.
    """

    def __init__(
        self,
        *args: Any,
        quant_desc_input: Any = None,
        quant_desc_weight: Any = None,
        quant_desc_output: Any = None,
        **kwargs: Any,
    ) -> None:
        from quant_core.nn.registry import QuantModuleRegistry

        super().__init__(*args, **kwargs)
        original = QuantModuleRegistry.original_of(type(self)) or next(
            c for c in type(self).__mro__ if not issubclass(c, QuantModule)
        )
        self._quant_original_key = QuantModuleRegistry.get_key(original)
        self._setup()
        descs = {
            "input": quant_desc_input,
            "weight": quant_desc_weight,
            "output": quant_desc_output,
        }
        for role, desc in descs.items():
            if desc is None:
                continue
            quantizer = getattr(self, f"{role}_quantizer", None)
            if quantizer is None:
                raise ValueError(
                    f"{type(self).__name__} has no {role}_quantizer for quant_desc_{role}"
                )
            quantizer.set_from_attribute_config(desc)

    def _setup(self) -> None:
        raise NotImplementedError

    @property
    def low_rank_branch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """SVDQuant's high-precision branch ``(lora_a (rank, in), lora_b (out, rank))``, or None."""
        a, b = self._buffers.get("svdquant_lora_a"), self._buffers.get("svdquant_lora_b")
        return None if a is None or b is None else (a, b)

    def set_low_rank_branch(self, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Add ``(x · input pre-quant scale) lora_aᵀ lora_bᵀ`` to the module's output (SVDQuant), or
        remove the branch (None). The factors are buffers (``svdquant_lora_a`` / ``svdquant_lora_b``),
        so they travel with ``state_dict``; ``save`` / ``restore`` record and recreate the branch."""
        for name, value in (("svdquant_lora_a", lora_a), ("svdquant_lora_b", lora_b)):
            self._buffers.pop(name, None)
            if value is not None:
                self.register_buffer(name, value.detach().contiguous())
        if lora_a is not None and _add_low_rank_branch not in self._forward_hooks.values():
            self.register_forward_hook(_add_low_rank_branch)  # a no-op once the branch is removed


def _add_low_rank_branch(module: QuantModule, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: ``output + (x · pre_quant_scale) Aᵀ Bᵀ`` (the branch runs on the unquantized input)."""
    branch = module.low_rank_branch
    if branch is None:
        return output
    x = args[0]
    pqs = module.input_quantizer.pre_quant_scale
    if pqs is not None:
        x = x * pqs.to(x.dtype)
    a, b = branch[0].to(x.dtype), branch[1].to(x.dtype)
    return output + (x @ a.T) @ b.T


class QuantInputBase(QuantModule):
    """Quantizes the first input and the output (the output quantizer starts disabled).

    The quantizers start from the class attributes ``default_quant_desc_input`` /
    ``default_quant_desc_output`` (ModelOpt's names; a subclass or an assignment on the class
    changes what later conversions create).
    """

    default_quant_desc_input: QuantizerAttributeConfig | dict[str, Any] = INPUT_DEFAULT
    default_quant_desc_output: QuantizerAttributeConfig | dict[str, Any] = INPUT_DEFAULT

    def _setup(self) -> None:
        self.input_quantizer = TensorQuantizer(self.default_quant_desc_input)
        self.output_quantizer = TensorQuantizer(self.default_quant_desc_output)
        self.output_quantizer.disable()

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(self.input_quantizer(input), *args, **kwargs)
        return self.output_quantizer(out)


def fold_into(weight: torch.Tensor, quantizer: nn.Module) -> None:
    """Write ``quantizer(weight)`` into ``weight`` and turn the quantizer off (its pre-quant scale
    and Hadamard rotation, now baked in, too); nothing when the quantizer changes nothing."""
    rotated = getattr(quantizer, "rotate_is_enabled", False)
    if not quantizer.is_enabled and quantizer.pre_quant_scale is None and not rotated:
        return
    with torch.no_grad():
        weight.data.copy_(quantizer(weight))
    quantizer.disable()
    quantizer.pre_quant_scale = None
    quantizer._weight_folded = True  # export warns that this weight is stored unquantized
    if rotated:
        quantizer.disable_rotate()


class FoldableWeight:
    """``fold_weight`` for quantized modules with a ``weight`` parameter and a ``weight_quantizer``."""

    def fold_weight(self) -> None:
        """Write the fake-quantized weight into the parameter and turn the weight quantizer off."""
        fold_into(self.weight, self.weight_quantizer)


class QuantLinearConvBase(FoldableWeight, QuantInputBase):
    """Quantizes input, weight and output of a layer whose forward uses ``self.weight``; the
    weight quantizer starts from the class attribute ``default_quant_desc_weight``."""

    default_quant_desc_weight: QuantizerAttributeConfig | dict[str, Any] = WEIGHT_DEFAULT

    def _setup(self) -> None:
        super()._setup()
        self.weight_quantizer = TensorQuantizer(self.default_quant_desc_weight)

    def _forward_with_weight(
        self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        raise NotImplementedError

    def _real_quant_gemm(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The registered real-quant GEMM for this layer (looked up once), None when none applies."""
        from quant_core.backends.gemm_registry import gemm_registry

        if "_real_quant_gemm_impl" not in self.__dict__:
            impl = gemm_registry.find_match(self, input, *args, **kwargs)
            if impl is None:
                warnings.warn(
                    f"{type(self).__name__}: no registered real-quant GEMM matches this layer "
                    "(backends.gemm_registry); it runs fake quantization",
                    stacklevel=3,
                )
            self.__dict__["_real_quant_gemm_impl"] = impl
        return self.__dict__["_real_quant_gemm_impl"]

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_use_real_quant_gemm", False) and input.numel() > 1:
            # after backends.enable_real_quant_gemm: a registered GEMM, except while calibrating
            iq = self.input_quantizer
            calibrating = iq.is_enabled and any(
                getattr(q, "_if_calib", False) for q in iq.modules()
            )
            gemm = None if calibrating else self._real_quant_gemm(input, *args, **kwargs)
            if gemm is not None:
                out = gemm(self, input, self.weight, self.bias, *args, **kwargs)
                return self.output_quantizer(out)
        x = self.input_quantizer(input)
        w = self.weight_quantizer(self.weight)
        return self.output_quantizer(self._forward_with_weight(x, w, *args, **kwargs))

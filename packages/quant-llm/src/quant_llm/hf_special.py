"""transformers classes quantized by their own rules: DBRX experts and fine-grained FP8 linears.

**DBRX** (``DbrxExpertGLU``): the experts live in 2-D parameters ``w1`` / ``v1`` / ``w2`` of shape
(E·F, H), and ``DbrxExperts`` calls the GLU once per expert with that expert's (F, H) slices, which
it multiplies with ``matmul``. As in ModelOpt 0.47, each expert's three projections become linear
layers with their own quantizers, under ModelOpt's names: ``mlp.w1_linear.3`` (gate),
``mlp.v1_linear.3`` (up), ``mlp.w2_linear.3`` (down), each with ``input_quantizer`` /
``weight_quantizer`` / ``output_quantizer`` (disabled). Unlike ModelOpt, the parameters stay (each
linear's ``weight`` is a view of its slice), so ``state_dict`` keys are unchanged and folding writes
into them.

**Fine-grained FP8** (transformers' ``FP8Linear``, e.g. DeepSeek-V3 checkpoints): converted into a
quantizable linear by dequantizing its FP8 weight with ``weight_scale_inv`` (per tensor or per
block) once, at conversion, into :attr:`QuantFP8Linear.dequantized_dtype` (bfloat16 unless set);
``weight_scale_inv`` is then dropped. It gets ``input_quantizer`` / ``weight_quantizer`` (ModelOpt's
names; no output quantizer), so any format can be calibrated and exported from it. ModelOpt keeps
the FP8 weight and dequantizes it at every forward (until ``unpack_weight()``); here the weight
is dequantized once, which costs memory (2 bytes per weight instead of 1) and makes calibration,
folding and export see an ordinary weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant_core.nn import QuantModule, TensorQuantizer
from quant_core.nn.quant_module import INPUT_DEFAULT, WEIGHT_DEFAULT, FoldableWeight
from quant_llm.derived_classes import quantized_subclass
from quant_llm.hf_moe import slice_index


class DbrxExpertLinear(FoldableWeight, nn.Linear):
    """One DBRX expert's projection as a linear layer with quantizers; ``weight`` is a view of its
    slice of the GLU's parameter (in ``nn.Linear`` (out, in) layout; writes go to the parameter)."""

    def __init__(self, owner: nn.Module, param_name: str, index: int, transposed: bool) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)  # unregistered: the owner holds this module
        self.param_name = param_name
        self.index = index
        self.transposed = transposed
        self.out_features, self.in_features = self.weight.shape
        self.input_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.weight_quantizer = TensorQuantizer(WEIGHT_DEFAULT)
        self.output_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.output_quantizer.disable()

    @property
    def weight(self) -> torch.Tensor:
        owner = self._owner
        w = getattr(owner, self.param_name).view(-1, owner.ffn_hidden_size, owner.hidden_size)
        w = w[self.index]
        return w.t() if self.transposed else w

    @property
    def bias(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight))
        return self.output_quantizer(y)

    def extra_repr(self) -> str:
        return f"{self.param_name}[{self.index}]"


class QuantDbrxExpertGLU(QuantModule):
    """``DbrxExpertGLU`` with per-expert ``w1_linear`` / ``v1_linear`` / ``w2_linear`` (ModelOpt's names)."""

    def _setup(self) -> None:
        n = self.moe_num_experts
        self.w1_linear = nn.ModuleList(DbrxExpertLinear(self, "w1", e, False) for e in range(n))
        self.v1_linear = nn.ModuleList(DbrxExpertLinear(self, "v1", e, False) for e in range(n))
        # down: x @ w2[e] = F.linear(x, w2[e].T)
        self.w2_linear = nn.ModuleList(DbrxExpertLinear(self, "w2", e, True) for e in range(n))

    def _expert_index(self, expert_w1: torch.Tensor) -> int:
        """The expert whose slice of ``w1`` DbrxExperts passed (from its storage offset)."""
        index = slice_index(expert_w1, self.w1, self.ffn_hidden_size * self.hidden_size)
        if index is None or index >= self.moe_num_experts:
            raise ValueError(
                f"{type(self).__name__}: expert_w1 is not a slice of this GLU's w1 (a copy, or "
                "a redistributed tensor); the quantized DBRX experts need DbrxExperts' own slices"
            )
        return index

    def forward(
        self,
        x: torch.Tensor,
        expert_w1: torch.Tensor,
        expert_v1: torch.Tensor | None = None,
        expert_w2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DBRX's GLU for the expert whose slices are given, through that expert's quantized linears."""
        e = self._expert_index(expert_w1)
        gate = self.activation_fn(self.w1_linear[e](x))
        return self.w2_linear[e](gate * self.v1_linear[e](x))

    def sibling_input_groups(self) -> list[list[str]]:
        """Each projection's experts run as one engine call (one input scale)."""
        n = self.moe_num_experts
        return [[f"{p}.{e}" for e in range(n)] for p in ("w1_linear", "v1_linear", "w2_linear")]


def _dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``weight · scale_inv`` (per tensor, or per (b0, b1) block) rounded once to ``dtype`` (the
    product of an FP8 value and a float32 scale is exact in float64)."""
    w = weight.to(torch.float64)
    scale = scale_inv.to(torch.float64)
    if scale.dim() == 2:
        rows, cols = w.shape
        if block_size is None:
            raise ValueError("FP8Linear with a 2-D weight_scale_inv but no block_size")
        b0, b1 = block_size
        if scale.shape != (-(-rows // b0), -(-cols // b1)):
            raise ValueError(
                f"FP8Linear weight {tuple(w.shape)} with block_size {tuple(block_size)} needs "
                f"weight_scale_inv of shape {(-(-rows // b0), -(-cols // b1))}, got "
                f"{tuple(scale.shape)}"
            )
        scale = scale.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
    elif scale.numel() != 1:
        raise ValueError(
            f"FP8Linear weight_scale_inv of shape {tuple(scale.shape)}: expected a scalar or a "
            "2-D block grid"
        )
    return (w * scale).to(dtype)


class QuantFP8Linear(FoldableWeight, QuantModule):
    """transformers' ``FP8Linear`` dequantized once into a quantizable linear (see the module docs)."""

    dequantized_dtype: torch.dtype = torch.bfloat16

    def _setup(self) -> None:
        if self.weight.element_size() == 1:
            scale_inv = getattr(self, "weight_scale_inv", None)
            if scale_inv is None:
                raise ValueError(f"{type(self).__name__}: an FP8 weight without weight_scale_inv")
            dtype = self.bias.dtype if self.bias is not None else self.dequantized_dtype
            block = getattr(self, "block_size", None)
            dequantized = _dequantize_fp8(self.weight.detach(), scale_inv.detach(), block, dtype)
            self.weight = nn.Parameter(dequantized, requires_grad=False)
        if "weight_scale_inv" in self._parameters:
            del self._parameters["weight_scale_inv"]
        self.input_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.weight_quantizer = TensorQuantizer(WEIGHT_DEFAULT)

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == input.dtype else self.weight.to(input.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != input.dtype:
            bias = bias.to(input.dtype)
        return F.linear(self.input_quantizer(input), self.weight_quantizer(weight), bias)


_MIXINS = {"DbrxExpertGLU": QuantDbrxExpertGLU, "FP8Linear": QuantFP8Linear}


def quantized_class(original: type) -> type:
    """``Quant<Name>`` for ``DbrxExpertGLU`` or ``FP8Linear`` (created once per class)."""
    mixin = _MIXINS[original.__name__]
    return quantized_subclass(mixin, original, __name__, mixin.__doc__ or "")

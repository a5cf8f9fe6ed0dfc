"""The built-in quantized modules: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, and a matmul wrapper."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant_core.nn.quant_module import INPUT_DEFAULT, QuantInputBase, QuantLinearConvBase
from quant_core.nn.registry import QuantModuleRegistry
from quant_core.nn.tensor_quantizer import TensorQuantizer


@QuantModuleRegistry.register({nn.Linear: "nn.Linear"})
class QuantLinear(QuantLinearConvBase, nn.Linear):
    """nn.Linear with input, weight and output quantizers.

    After ``backends.enable_real_quant_gemm`` it runs the first matching registered real-quant
    GEMM instead of its fake-quantized matmul (see :mod:`quant_core.backends.gemm_registry`).
    """

    def _forward_with_weight(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(input, weight, self.bias)


class _QuantConvNd(QuantLinearConvBase):
    def _forward_with_weight(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, weight, self.bias)


@QuantModuleRegistry.register({nn.Conv1d: "nn.Conv1d"})
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """nn.Conv1d with input, weight and output quantizers."""


@QuantModuleRegistry.register({nn.Conv2d: "nn.Conv2d"})
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """nn.Conv2d with input, weight and output quantizers."""


@QuantModuleRegistry.register({nn.Conv3d: "nn.Conv3d"})
class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """nn.Conv3d with input, weight and output quantizers."""


class _QuantConvTransposeNd(QuantLinearConvBase):
    _dims = 0
    _fn = staticmethod(F.conv_transpose1d)

    def _forward_with_weight(
        self, input: torch.Tensor, weight: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        output_padding = self._output_padding(
            input,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            self._dims,
            self.dilation,
        )
        return self._fn(
            input,
            weight,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


@QuantModuleRegistry.register({nn.ConvTranspose1d: "nn.ConvTranspose1d"})
class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """nn.ConvTranspose1d with input, weight and output quantizers."""

    _dims = 1
    _fn = staticmethod(F.conv_transpose1d)


@QuantModuleRegistry.register({nn.ConvTranspose2d: "nn.ConvTranspose2d"})
class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with input, weight and output quantizers."""

    _dims = 2
    _fn = staticmethod(F.conv_transpose2d)


@QuantModuleRegistry.register({nn.ConvTranspose3d: "nn.ConvTranspose3d"})
class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """nn.ConvTranspose3d with input, weight and output quantizers."""

    _dims = 3
    _fn = staticmethod(F.conv_transpose3d)


class BMM(nn.Module):
    """``torch.matmul(input, other)`` as a module, so attention can name it (``self.bmm``) and be quantized."""

    def forward(self, input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return torch.matmul(input, other)


MatMul = BMM


@QuantModuleRegistry.register({BMM: "BMM"})
class QuantBMM(QuantInputBase, BMM):
    """Quantized matmul: ``input_quantizer`` and ``other_input_quantizer`` on the operands, and an output quantizer."""

    def _setup(self) -> None:
        super()._setup()
        self.other_input_quantizer = TensorQuantizer(INPUT_DEFAULT)

    def forward(
        self, input: torch.Tensor, other: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        out = torch.matmul(self.input_quantizer(input), self.other_input_quantizer(other))
        return self.output_quantizer(out)

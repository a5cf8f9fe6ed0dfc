"""Quantized normalization layers (input quantizer, and an output quantizer that starts disabled).

ModelOpt registers BatchNorm1d-3d, InstanceNorm1d-3d and LayerNorm this way; here the classes
exist for direct use and for ``mtq.register`` (see :data:`quant_core.nn.modules.EXTRA_MODULES`).
"""

from torch import nn

from quant_core.nn.quant_module import QuantInputBase


class QuantBatchNorm1d(QuantInputBase, nn.BatchNorm1d):
    """nn.BatchNorm1d with input and output quantizers."""


class QuantBatchNorm2d(QuantInputBase, nn.BatchNorm2d):
    """nn.BatchNorm2d with input and output quantizers."""


class QuantBatchNorm3d(QuantInputBase, nn.BatchNorm3d):
    """nn.BatchNorm3d with input and output quantizers."""


class QuantInstanceNorm1d(QuantInputBase, nn.InstanceNorm1d):
    """nn.InstanceNorm1d with input and output quantizers."""


class QuantInstanceNorm2d(QuantInputBase, nn.InstanceNorm2d):
    """nn.InstanceNorm2d with input and output quantizers."""


class QuantInstanceNorm3d(QuantInputBase, nn.InstanceNorm3d):
    """nn.InstanceNorm3d with input and output quantizers."""


class QuantLayerNorm(QuantInputBase, nn.LayerNorm):
    """nn.LayerNorm with input and output quantizers."""


__all__ = [
    "QuantBatchNorm1d",
    "QuantBatchNorm2d",
    "QuantBatchNorm3d",
    "QuantInstanceNorm1d",
    "QuantInstanceNorm2d",
    "QuantInstanceNorm3d",
    "QuantLayerNorm",
]

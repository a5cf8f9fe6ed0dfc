"""Quantized pooling layers (Max/Avg 1-3d, adaptive Avg 1-3d) and ModelOpt's short aliases."""

from torch import nn

from quant_core.nn.quant_module import QuantInputBase


class QuantMaxPool1d(QuantInputBase, nn.MaxPool1d):
    """nn.MaxPool1d with input and output quantizers."""


class QuantMaxPool2d(QuantInputBase, nn.MaxPool2d):
    """nn.MaxPool2d with input and output quantizers."""


class QuantMaxPool3d(QuantInputBase, nn.MaxPool3d):
    """nn.MaxPool3d with input and output quantizers."""


class QuantAvgPool1d(QuantInputBase, nn.AvgPool1d):
    """nn.AvgPool1d with input and output quantizers."""


class QuantAvgPool2d(QuantInputBase, nn.AvgPool2d):
    """nn.AvgPool2d with input and output quantizers."""


class QuantAvgPool3d(QuantInputBase, nn.AvgPool3d):
    """nn.AvgPool3d with input and output quantizers."""


class QuantAdaptiveAvgPool1d(QuantInputBase, nn.AdaptiveAvgPool1d):
    """nn.AdaptiveAvgPool1d with input and output quantizers."""


class QuantAdaptiveAvgPool2d(QuantInputBase, nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d with input and output quantizers."""


class QuantAdaptiveAvgPool3d(QuantInputBase, nn.AdaptiveAvgPool3d):
    """nn.AdaptiveAvgPool3d with input and output quantizers."""


MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
)

__all__ = [
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMaxPool3d",
]

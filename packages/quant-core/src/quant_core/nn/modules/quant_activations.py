"""Quantized activations: ModelOpt quantizes ``nn.LeakyReLU``'s input."""

from torch import nn

from quant_core.nn.quant_module import QuantInputBase


class QuantLeakyReLU(QuantInputBase, nn.LeakyReLU):
    """nn.LeakyReLU with input and output quantizers."""


__all__ = ["QuantLeakyReLU"]

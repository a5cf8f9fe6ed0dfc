"""ModelOpt path ``nn.modules.quant_module``: the quantized-module bases."""

from quant_core.nn.quant_module import QuantInputBase, QuantLinearConvBase, QuantModule

__all__ = ["QuantInputBase", "QuantLinearConvBase", "QuantModule"]

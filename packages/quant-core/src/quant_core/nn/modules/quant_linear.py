"""ModelOpt path ``nn.modules.quant_linear``: QuantLinear (``Linear`` is ModelOpt's alias)."""

from quant_core.nn.builtin_modules import QuantLinear

Linear = QuantLinear

__all__ = ["Linear", "QuantLinear"]

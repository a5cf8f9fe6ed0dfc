"""ModelOpt's ``nn.modules.quant_instancenorm`` path: the quantized InstanceNorm classes.

They live in :mod:`quant_core.nn.modules.quant_norms` and, as there, are not registered by default
(see ``EXTRA_MODULES``).
"""

from quant_core.nn.modules.quant_norms import (
    QuantInstanceNorm1d,
    QuantInstanceNorm2d,
    QuantInstanceNorm3d,
)

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]

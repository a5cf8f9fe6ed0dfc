"""ModelOpt's ``nn.modules.quant_batchnorm`` path: the quantized BatchNorm classes.

They live in :mod:`quant_core.nn.modules.quant_norms` and are not registered by default (see
``EXTRA_MODULES``).
"""

from quant_core.nn.modules.quant_norms import QuantBatchNorm1d, QuantBatchNorm2d, QuantBatchNorm3d

__all__ = ["QuantBatchNorm1d", "QuantBatchNorm2d", "QuantBatchNorm3d"]

"""ModelOpt's ``nn.modules.quant_layernorm`` path: the quantized LayerNorm class.

It lives in :mod:`quant_core.nn.modules.quant_norms` and is not registered by default (see
``EXTRA_MODULES``).
"""

from quant_core.nn.modules.quant_norms import QuantLayerNorm

__all__ = ["QuantLayerNorm"]

"""ModelOpt's ``quantization.utils.layerwise_calib``: the layer-input collector of layer-by-layer
calibration (implemented in :mod:`quant_core.layerwise`)."""

from quant_core.layerwise import LayerActivationCollector

__all__ = ["LayerActivationCollector"]

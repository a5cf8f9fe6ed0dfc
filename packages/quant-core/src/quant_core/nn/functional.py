"""ModelOpt's ``nn.functional`` path: ``normalized_hadamard_transform`` (from :mod:`quant_core.nn.rotation`)."""

from quant_core.nn.rotation import normalized_hadamard_transform

__all__ = ["normalized_hadamard_transform"]

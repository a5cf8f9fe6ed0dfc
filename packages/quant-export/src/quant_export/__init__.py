"""quant-export: see the package README for what this layer holds."""

from quant_export._version import __version__

__all__ = ["__version__"]

"""quant-kernels: see the package README for what this layer holds."""

from quant_kernels._version import __version__

__all__ = ["__version__"]

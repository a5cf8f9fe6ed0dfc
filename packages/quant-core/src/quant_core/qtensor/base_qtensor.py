"""ModelOpt's ``BaseQuantizedTensor``: quantized data plus the original shape and dtype."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class BaseQuantizedTensor(ABC):
    """Quantized ``_quantized_data`` of a tensor whose shape and dtype ``metadata`` records;
    subclasses implement ``quantize`` (a classmethod) and ``dequantize``."""

    def __init__(
        self, original_shape: torch.Size, original_dtype: torch.dtype, quantized_data: torch.Tensor
    ):
        self.metadata = {"shape": torch.Size(original_shape), "dtype": original_dtype}
        self._quantized_data = quantized_data

    @classmethod
    @abstractmethod
    def quantize(cls, input: torch.Tensor, block_size: int, *args: Any, **kwargs: Any) -> Any:
        """Quantize ``input``: the quantized tensor and its scales."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None, **kwargs: Any) -> torch.Tensor:
        """The dequantized tensor (``dtype``: default the original one)."""

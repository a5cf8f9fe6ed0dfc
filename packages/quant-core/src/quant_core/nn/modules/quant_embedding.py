"""Quantized ``nn.Embedding``: the table (``weight_quantizer``) and the looked-up output (``output_quantizer``, off).

Embedding inputs are integer indices, so there is no input quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant_core.nn.quant_module import INPUT_DEFAULT, FoldableWeight, QuantModule
from quant_core.nn.tensor_quantizer import TensorQuantizer


class QuantEmbedding(FoldableWeight, QuantModule, nn.Embedding):
    """nn.Embedding with a per-tensor INT8 weight quantizer and a disabled output quantizer."""

    def _setup(self) -> None:
        self.weight_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.output_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.output_quantizer.disable()

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight)
        out = F.embedding(
            input,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
        return self.output_quantizer(out)


__all__ = ["QuantEmbedding"]

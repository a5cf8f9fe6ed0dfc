"""Quantized GPT-2 ``Conv1D``: a linear layer whose weight Hugging Face stores transposed (in, out).

After conversion the module holds its weight in ``nn.Linear`` layout (out, in) as a transposed view
of the same storage (no copy), so per-channel (axis 0) and block-wise (last axis) weight quantizers
mean what they mean for ``nn.Linear`` and quant-core's algorithms (AWQ, SmoothQuant, GPTQ, which
select ``nn.Linear`` instances) treat it as the linear layer it is. ``state_dict`` and ``load_state_dict`` keep Hugging Face's (in, out) layout, so
checkpoints stay interchangeable with unquantized ``Conv1D`` models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from quant_core.nn import QuantLinearConvBase


def _weight_to_hf_layout(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t()


def _weight_from_hf_layout(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    key = prefix + "weight"
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.shape == (module.in_features, module.out_features):
        state_dict[key] = value.t()


class QuantConv1D(QuantLinearConvBase, Conv1D, nn.Linear):
    """GPT-2 ``Conv1D`` with input, weight and output quantizers, computing ``F.linear`` on an (out, in) weight.

    Once converted it is an ``nn.Linear`` in every respect (layout, ``in_features``, ``out_features``),
    so it also subclasses ``nn.Linear``: quant-core's algorithms select layers with that check.
    """

    def _setup(self) -> None:
        self.in_features, self.out_features = self.nx, self.nf
        self.weight = nn.Parameter(self.weight.data.t(), requires_grad=self.weight.requires_grad)
        self.register_state_dict_post_hook(_weight_to_hf_layout)
        self.register_load_state_dict_pre_hook(_weight_from_hf_layout)
        super()._setup()

    def _forward_with_weight(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(input, weight, self.bias)

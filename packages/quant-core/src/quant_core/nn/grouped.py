"""GroupedQuantizer: one quantizer per weight of a layer that holds several (ModelOpt 0.47).

A layer with ``num_gemms`` independently quantized weights (fused experts, grouped GEMMs) keeps
one member quantizer per weight, each with its own amax: ``grouped[i](weight_i)``. Unlike
:class:`SequentialQuantizer`, which chains its stages over one tensor, the members act on
different tensors. Calling the container applies the first member (the representative, for code
that handles one weight); reads of its attributes give the first member's value; calls of
quantizer methods and assignments go to every member.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant_core.config.schema import QuantizerAttributeConfig
from quant_core.nn.sequential import SequentialQuantizer, set_each_from_attribute_config
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = ["GroupedQuantizer"]

_BROADCAST_SETTERS = ("amax", "pre_quant_scale", "num_bits", "axis", "block_sizes", "fake_quant")


class GroupedQuantizer(nn.ModuleList):
    """A list of :class:`TensorQuantizer` / :class:`SequentialQuantizer`, one per weight."""

    def __init__(self, *quantizers: TensorQuantizer | SequentialQuantizer) -> None:
        if not quantizers or not all(
            isinstance(q, (TensorQuantizer, SequentialQuantizer)) for q in quantizers
        ):
            raise ValueError(
                "GroupedQuantizer takes one or more TensorQuantizer or SequentialQuantizer modules"
            )
        super().__init__(quantizers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The first member applied to ``inputs`` (index the container for the others)."""
        return self[0](inputs)

    def set_from_attribute_config(
        self,
        cfgs: list[QuantizerAttributeConfig | dict[str, Any]]
        | QuantizerAttributeConfig
        | dict[str, Any],
    ) -> None:
        """One config for every member, or a list with one config per member (lengths must agree)."""
        set_each_from_attribute_config(self, cfgs, "members")

    @property
    def is_enabled(self) -> bool:
        """The first member's enable state (members share one config)."""
        return self[0].is_enabled

    def enable(self) -> list[Any]:
        """Enable every member (their return values, in order)."""
        return [q.enable() for q in self]

    def disable(self) -> list[Any]:
        """Disable every member (their return values, in order)."""
        return [q.disable() for q in self]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name.startswith("__") or name.isdigit() or "_modules" not in self.__dict__:
                raise
            if not len(self):
                raise
        first = getattr(self[0], name)
        if not callable(first) or isinstance(first, (nn.Module, torch.Tensor)):
            return first

        def broadcast(*args: Any, **kwargs: Any) -> list[Any]:
            return [getattr(q, name)(*args, **kwargs) for q in self]

        broadcast.__name__ = name
        broadcast.__doc__ = f"``{name}`` called on every member; their results in order."
        return broadcast

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BROADCAST_SETTERS and "_modules" in self.__dict__ and len(self):
            for q in self:
                setattr(q, name, value)
            return
        super().__setattr__(name, value)

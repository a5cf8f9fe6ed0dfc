"""SequentialQuantizer: several TensorQuantizers applied in turn (e.g. W4A8: INT4 blocks, then FP8)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant_core.config.schema import QuantizerAttributeConfig
from quant_core.nn.tensor_quantizer import TensorQuantizer


def set_each_from_attribute_config(
    members: nn.Module,
    cfgs: list[QuantizerAttributeConfig | dict[str, Any]]
    | QuantizerAttributeConfig
    | dict[str, Any],
    what: str,
) -> None:
    """Set each quantizer of a container from its config; one config (not a list) sets them all."""
    if not isinstance(cfgs, (list, tuple)):
        cfgs = [cfgs] * len(members)
    if len(cfgs) != len(members):
        raise ValueError(
            f"{type(members).__name__} has {len(members)} {what}, got {len(cfgs)} configs"
        )
    for quantizer, cfg in zip(members, cfgs):
        quantizer.set_from_attribute_config(cfg)


class SequentialQuantizer(nn.Sequential):
    """A chain of TensorQuantizers; built when a config gives a list of attribute dicts."""

    def __init__(self, *quantizers: TensorQuantizer):
        if not quantizers or not all(isinstance(q, TensorQuantizer) for q in quantizers):
            raise ValueError("SequentialQuantizer takes one or more TensorQuantizer modules")
        super().__init__(*quantizers)

    def set_from_attribute_config(
        self,
        cfgs: list[QuantizerAttributeConfig | dict[str, Any]]
        | QuantizerAttributeConfig
        | dict[str, Any],
    ) -> None:
        """Set each stage from the matching attribute config (the lengths must agree); one config applies to every stage."""
        set_each_from_attribute_config(self, cfgs, "stages")

    @property
    def is_enabled(self) -> bool:
        """True when any stage is enabled."""
        return any(q.is_enabled for q in self)

    def enable(self) -> None:
        """Enable every stage."""
        for q in self:
            q.enable()

    def disable(self) -> None:
        """Disable every stage."""
        for q in self:
            q.disable()

    def reset_amax(self) -> None:
        """Forget every stage's amax."""
        for q in self:
            q.reset_amax()

    def disable_rotate(self) -> None:
        """Turn every stage's Hadamard rotation off."""
        for q in self:
            q.disable_rotate()

    @property
    def pre_quant_scale(self) -> torch.Tensor | None:
        """The first stage's pre-quant scale."""
        return self[0].pre_quant_scale

    @pre_quant_scale.setter
    def pre_quant_scale(self, value: torch.Tensor | None) -> None:
        self[0].pre_quant_scale = value

    @property
    def amax(self) -> torch.Tensor | None:
        """The first stage's amax; assigning sets every stage's."""
        return self[0].amax

    @amax.setter
    def amax(self, value: Any) -> None:
        for q in self:
            q.amax = value

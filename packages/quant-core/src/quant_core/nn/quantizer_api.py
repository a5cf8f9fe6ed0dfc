"""ModelOpt's TensorQuantizer methods for export and checkpointing: export_amax, step_size, modelopt state."""

from __future__ import annotations

import warnings
from typing import Any

import torch


class ModelOptQuantizerAPI:
    """Mixed into TensorQuantizer: the ModelOpt methods that read its attributes and amax."""

    def export_amax(self) -> torch.Tensor | None:
        """amax shaped as exporters expect: per-tensor as shape ``[1]``, one axis squeezed to 1-D, blocks as stored.

        Values are clamped to [float32 tiny, float32 max] so that scales derived from them are finite.
        """
        amax = self.amax
        if amax is None:
            return None
        amax = amax.detach().float()
        amax = amax.clamp(min=torch.finfo(amax.dtype).tiny, max=torch.finfo(amax.dtype).max)
        if self.is_dynamic or self.block_sizes is not None:
            return amax
        if self.axis is None:
            return amax.reshape(1)
        if isinstance(self.axis, int) or len(self.axis) == 1:
            return amax.squeeze()
        return amax

    @property
    def step_size(self) -> torch.Tensor | None:
        """The integer quantization step, ``amax / qmax`` (None, with a warning, without an amax)."""
        if self.amax is None:
            warnings.warn(
                "step_size is undefined without an amax (dynamic or uncalibrated)", stacklevel=2
            )
            return None
        element = self.format.element
        if not element.is_int:
            raise ValueError(
                f"step_size is defined for integer formats only, num_bits={self.num_bits!r}"
            )
        return self.amax / element.max_value

    def get_modelopt_state(self, properties_only: bool = False) -> dict[str, Any]:
        """The quantizer's attributes (and, unless ``properties_only``, its tensor names and shapes)."""
        state: dict[str, Any] = {
            "attributes": self.attribute_config.to_json_dict(),
            "enabled": self.is_enabled,
        }
        if not properties_only:
            own = {
                **dict(self.named_buffers(recurse=False)),
                **dict(self.named_parameters(recurse=False)),
            }
            state["_pytorch_state_metadata"] = {k: list(v.shape) for k, v in own.items()}
        return state

    def set_from_modelopt_state(
        self, modelopt_state: dict[str, Any], properties_only: bool = False
    ) -> None:
        """Set attributes from :meth:`get_modelopt_state`; unless ``properties_only``, create its tensors
        (zeros of the saved shapes) for a following ``load_state_dict``."""
        from quant_core.config.schema import parse_attributes

        self.set_from_attribute_config(parse_attributes(modelopt_state["attributes"]))
        self.enable() if modelopt_state.get("enabled", True) else self.disable()
        if properties_only:
            return
        for key, shape in modelopt_state.get("_pytorch_state_metadata", {}).items():
            if key == "_amax":
                self.amax = None
                self.amax = torch.zeros(shape)
            elif key == "_pre_quant_scale":
                self.pre_quant_scale = torch.zeros(shape)
            else:
                self.register_buffer(key, torch.zeros(shape))

"""ModelOpt's TensorQuantizer methods that read its attributes: export_amax, step_size, modelopt state,
constant amax, rotation and custom-backend switches, and what makes a quantizer unexportable."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from quant_core.config.schema import QuantizerAttributeConfig
from quant_core.nn.rotation import normalized_hadamard_transform


def merge_attribute_update(
    current: QuantizerAttributeConfig, update: dict[str, Any]
) -> dict[str, Any]:
    """The attributes after a partial ``update`` (ModelOpt's ``set_from_attribute_config`` with a dict).

    As in ModelOpt, an update that sets ``block_sizes`` without ``axis`` clears the current
    ``axis`` (block sizes win), and ``{"enable": False}`` alone also turns rotation off.
    """
    merged = {**current.model_dump(), **update}
    if update.get("block_sizes") is not None and "axis" not in update:
        merged["axis"] = None
    if update == {"enable": False}:
        merged["rotate"] = current.rotate_config.model_copy(update={"enable": False})
    return merged


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

    # ----- constant amax, rotation, custom backend ----------------------------------------------
    @property
    def has_constant_amax(self) -> bool:
        """True with ``constant_amax`` or ``use_constant_amax``: amax is pinned, never calibrated."""
        attrs = self.attribute_config
        return attrs.constant_amax is not None or attrs.use_constant_amax

    @property
    def rotate_is_enabled(self) -> bool:
        """Whether the input is Hadamard-rotated before quantization."""
        return self.attribute_config.rotate_config.enable

    @property
    def rotate_back_is_enabled(self) -> bool:
        """Whether the output is rotated back after quantization (``mode="rotate_back"``)."""
        rotate = self.attribute_config.rotate_config
        return rotate.enable and rotate.mode == "rotate_back"

    def disable_rotate(self) -> None:
        """Turn rotation off (after folding a rotated weight, whose rotation is then baked in)."""
        if self.rotate_is_enabled:
            rotate = self.attribute_config.rotate_config.model_copy(update={"enable": False})
            self.set_from_attribute_config({"rotate": rotate})

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        rotate = self._rotation
        return normalized_hadamard_transform(x, rotate.rotate_fp32, rotate.block_size)

    @property
    def backend(self) -> str | None:
        """Name of the custom quantization backend (``nn.register_quant_backend``), or None."""
        return self.attribute_config.backend

    @property
    def backend_extra_args(self) -> dict[str, Any]:
        """The ``backend_extra_args`` attribute (an empty dict when unset), for backend entrypoints."""
        return dict(self.attribute_config.backend_extra_args or {})

    def unexportable_reason(self) -> str | None:
        """Why export and ``compress`` cannot represent this quantizer, or None when they can.

        A Hadamard rotation is not part of any checkpoint format here (a deployment engine would
        not rotate the activations), a custom backend's numerics are user code, and NVFP4 "four
        over six" scales are not written by any exporter (ModelOpt's ``compress`` refuses it too).
        """
        if self.rotate_is_enabled:
            return "it Hadamard-rotates its input (rotate=...), which no export format records"
        if self.backend is not None:
            return (
                f"it quantizes with the custom backend {self.backend!r}, which export cannot read"
            )
        if getattr(self, "lsq_state", None) is not None:
            return (
                "it learns separate quantization and dequantization block amaxes (lsq), which "
                "the exporters and mtq.compress do not write"
            )
        if self.format.four_over_six:
            return (
                "it is NVFP4 'four over six' (block_sizes['four_over_six']): its per-block M=4/M=6 "
                "choice and 6*256 global scale are not written by the exporters or mtq.compress"
            )
        return None

"""Quantized fused MoE experts (transformers 5.x ``@use_experts_implementation`` classes such as MixtralExperts).

transformers 5.x stores every expert of a layer in 3-D parameters (``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I), optionally transposed, with biases, or ``up_proj`` without a gate). The
quantized class gives each expert and projection its own input/weight/output quantizers in an
:class:`ExpertProjection` (``experts.quant_gate_up_proj.3.weight_quantizer``), whose ``weight`` is
that expert's slice in ``nn.Linear`` layout, so quant-core calibrates and folds it like a linear
layer. Parameters and ``state_dict`` keys are unchanged.

Calibration can send every token through every expert (:func:`calibrate_all_experts`): outputs
still follow the router, but each expert's quantizers see all tokens, so experts the router never
picked are calibrated too. :func:`experts_without_tokens` reports experts the router sent no
calibration token.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant_core.nn import QuantModule, TensorQuantizer
from quant_core.nn.quant_module import INPUT_DEFAULT, WEIGHT_DEFAULT
from quant_llm.derived_classes import quantized_subclass

_ALL_EXPERTS = contextvars.ContextVar("quant_llm_calibrate_all_experts", default=False)


class ExpertProjection(nn.Linear):
    """One expert's projection as a linear layer with quantizers; ``weight`` is its (out, in) slice of the fused parameter.

    It subclasses ``nn.Linear`` (without parameters of its own) so that quant-core's algorithms
    (AWQ, SmoothQuant, GPTQ), which select ``nn.Linear`` layers, treat each expert as the linear
    layer it is; writes to ``weight`` go to the fused parameter.
    """

    def __init__(self, owner: nn.Module, param_name: str, index: int) -> None:
        nn.Module.__init__(self)
        # A plain (unregistered) reference: the owner holds this module, not the other way round.
        object.__setattr__(self, "_owner", owner)
        self.param_name = param_name
        self.index = index
        self.out_features, self.in_features = self.weight.shape
        self.input_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.weight_quantizer = TensorQuantizer(WEIGHT_DEFAULT)
        self.output_quantizer = TensorQuantizer(INPUT_DEFAULT)
        self.output_quantizer.disable()
        self.routed_tokens = 0

    @property
    def weight(self) -> torch.Tensor:
        """This expert's weight as a view in ``nn.Linear`` layout (writes go to the fused parameter)."""
        w = getattr(self._owner, self.param_name)[self.index]
        return w.t() if self._owner.is_transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        """This expert's bias, or None when the experts have none."""
        if not self._owner.has_bias:
            return None
        return getattr(self._owner, f"{self.param_name}_bias")[self.index]

    @property
    def calibrating(self) -> bool:
        """True while quant-core collects statistics through this projection's input quantizer."""
        return bool(getattr(self.input_quantizer, "_if_calib", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized ``F.linear`` of this expert."""
        y = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return self.output_quantizer(y)

    def fold_weight(self) -> None:
        """Write the fake-quantized weight into the fused parameter and turn the weight quantizer off."""
        if not self.weight_quantizer.is_enabled:
            return
        with torch.no_grad():
            self.weight.copy_(self.weight_quantizer(self.weight))
        self.weight_quantizer.disable()

    def extra_repr(self) -> str:
        return f"{self.param_name}[{self.index}]"


class QuantFusedExperts(QuantModule):
    """Mixin for fused-experts classes: per-expert quantizers and a routed forward that applies them."""

    def _setup(self) -> None:
        up = "gate_up_proj" if self.has_gate else "up_proj"
        self._quant_up_name = up
        self.quant_up_proj = nn.ModuleList(
            ExpertProjection(self, up, e) for e in range(self.num_experts)
        )
        self.quant_down_proj = nn.ModuleList(
            ExpertProjection(self, "down_proj", e) for e in range(self.num_experts)
        )

    def sibling_input_groups(self) -> list[list[str]]:
        """The experts' up and down projections: each set runs as one engine call (one input
        scale), although every expert reads its own tokens (see :mod:`quant_core.input_groups`)."""
        return [
            [f"quant_up_proj.{e}" for e in range(self.num_experts)],
            [f"quant_down_proj.{e}" for e in range(self.num_experts)],
        ]

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.quant_up_proj[e](x)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = self.quant_down_proj[e](h)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        return h

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Route each token to its top-k experts (as the eager implementation), through the quantizers."""
        out = torch.zeros_like(hidden_states)
        all_experts = _ALL_EXPERTS.get()
        for e in range(self.num_experts):
            token_idx, k_pos = torch.where(top_k_index == e)
            calibrating = self.quant_up_proj[e].calibrating
            if calibrating:
                self.quant_up_proj[e].routed_tokens += int(token_idx.numel())
            if all_experts and calibrating:
                expert_out = self._expert(e, hidden_states)[token_idx]
            elif token_idx.numel():
                expert_out = self._expert(e, hidden_states[token_idx])
            else:
                continue
            weights = top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, (expert_out * weights).to(out.dtype))
        return out


def is_fused_experts_class(cls: type) -> bool:
    """True for classes decorated with transformers' ``use_experts_implementation``."""
    forward = getattr(cls, "forward", None)
    code = getattr(forward, "__code__", None)
    return (
        code is not None
        and "_experts_implementation" in code.co_names
        and hasattr(cls, "_apply_gate")
    )


def quant_experts_class(original: type) -> type:
    """The quantized class for a fused-experts class (created once, named ``Quant<Name>``)."""
    return quantized_subclass(
        QuantFusedExperts,
        original,
        __name__,
        f"{original.__name__} with per-expert input, weight and output quantizers.",
    )


@contextmanager
def calibrate_all_experts() -> Iterator[None]:
    """Within the block, calibration sends every token through every expert (outputs still follow the router)."""
    token = _ALL_EXPERTS.set(True)
    try:
        yield
    finally:
        _ALL_EXPERTS.reset(token)


def all_experts_forward_loop(
    forward_loop: Callable[[nn.Module], Any],
) -> Callable[[nn.Module], Any]:
    """Wrap a calibration ``forward_loop`` so that it runs under :func:`calibrate_all_experts`."""

    def loop(model: nn.Module) -> Any:
        with calibrate_all_experts():
            return forward_loop(model)

    return loop


def experts_without_tokens(model: nn.Module) -> dict[str, list[int]]:
    """Experts (by fused-experts module name) to which the router sent no token during calibration."""
    report = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantFusedExperts):
            idle = [p.index for p in module.quant_up_proj if p.routed_tokens == 0]
            if idle:
                report[name] = idle
    return report


_NESTED_CONFIGS = ("text_config", "vision_config", "audio_config", "speech_config")


def force_eager_experts_impl_on_the_fly(model: nn.Module) -> None:
    """Set ``config._experts_implementation = "eager"`` (and on its text / vision / audio / speech
    sub-configs) when ``model`` holds a fused-experts module (ModelOpt 0.47's function of this name).

    Quantized experts here always run their own per-expert forward through the quantizers, whatever
    the implementation setting; this makes the unquantized experts of the model (and a model saved
    from it) use the eager ``F.linear`` path too, as after ModelOpt's call.
    """
    if not any(
        is_fused_experts_class(type(m)) or isinstance(m, QuantFusedExperts) for m in model.modules()
    ):
        return
    seen: set[int] = set()

    def force(cfg: object) -> None:
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        if hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
        for sub in _NESTED_CONFIGS:
            force(getattr(cfg, sub, None))

    force(getattr(model, "config", None))

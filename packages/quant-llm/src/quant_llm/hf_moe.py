"""Quantized fused MoE experts: modules holding every expert in 3-D ``gate_up_proj`` / ``down_proj`` parameters.

transformers 5.x stores every expert of a layer in 3-D parameters (``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I), optionally transposed, with biases, or ``up_proj`` without a gate). Any
module holding them is quantized, as ModelOpt 0.47 detects them (:func:`fused_experts_layout`: a
``num_experts`` attribute, a 3-D ``down_proj`` and a 3-D ``gate_up_proj``, or a 3-D ``up_proj``
with neither ``gate_proj`` nor ``gate_up_proj``): classes decorated with transformers'
``use_experts_implementation`` run the routed per-expert forward here, any other such module runs
its own forward, whose ``F.linear`` calls on an expert's slice are quantized.

The quantizers live on the experts module under ModelOpt's names, one per expert in an
``nn.ModuleList``: ``gate_up_proj_weight_quantizers`` / ``down_proj_weight_quantizers`` (as in
ModelOpt) and ``gate_up_proj_input_quantizers`` / ``down_proj_input_quantizers`` (``up_proj_*`` for
experts without a gate). ModelOpt's wildcards address them as it does (``*gate_up_proj_weight_quantizer``
and ``*weight_quantizer`` match ``...gate_up_proj_weight_quantizers.3`` through the same index-stripping
rule, see :func:`quant_core.config.schema.normalized_quantizer_name`). ModelOpt keeps one *shared*
input quantizer per projection (``gate_up_proj_input_quantizer``); here each expert keeps its own
(so per-expert AWQ / SmoothQuant scales exist) and calibration gives them one shared amax, the
largest (one engine scale), so the singular name reads and writes all of them
(:class:`ExpertsQuantizerView`). Fused experts have no output quantizers (nor in ModelOpt).

Each expert's projection is also an :class:`ExpertProjection` child (``experts.quant_up_proj.3``),
an ``nn.Linear`` without parameters of its own whose ``weight`` is that expert's slice in
``nn.Linear`` layout and whose ``input_quantizer`` / ``weight_quantizer`` are that expert's
quantizers above, so quant-core calibrates and folds it like a linear layer. Parameters and their
``state_dict`` keys are unchanged.

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
from quant_core.nn.quant_module import INPUT_DEFAULT, WEIGHT_DEFAULT, FoldableWeight
from quant_llm.derived_classes import quantized_subclass

_ALL_EXPERTS = contextvars.ContextVar("quant_llm_calibrate_all_experts", default=False)
_F_LINEAR = F.linear  # the real one: the generic experts' forward replaces F.linear while it runs
_OWN = object()  # ExpertProjection.forward: no bias given, use the expert's own


def slice_index(view: torch.Tensor, param: torch.Tensor, step: int) -> int | None:
    """``i`` when ``view`` starts ``i * step`` elements into ``param``'s storage (the ``i``-th expert's
    slice, recognised by its storage as ModelOpt recognises it), else None (a copy, another tensor)."""
    try:
        same = view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    except (
        RuntimeError,
        NotImplementedError,
    ):  # tensor subclasses without a storage (e.g. DTensor)
        return None
    if not same or step <= 0:
        return None
    index, rest = divmod(view.storage_offset() - param.storage_offset(), step)
    return index if rest == 0 and index >= 0 else None


class ExpertProjection(FoldableWeight, nn.Linear):
    """One expert's projection as a linear layer; ``weight`` is its (out, in) slice of the fused parameter.

    It subclasses ``nn.Linear`` (without parameters or quantizers of its own) so that quant-core's
    algorithms (AWQ, SmoothQuant, GPTQ), which select ``nn.Linear`` layers, treat each expert as the
    linear layer it is; writes to ``weight`` go to the fused parameter, and ``input_quantizer`` /
    ``weight_quantizer`` are this expert's entries of the owner's ``<param>_input_quantizers`` /
    ``<param>_weight_quantizers`` lists.
    """

    def __init__(self, owner: nn.Module, param_name: str, index: int) -> None:
        nn.Module.__init__(self)
        # A plain (unregistered) reference: the owner holds this module, not the other way round.
        object.__setattr__(self, "_owner", owner)
        self.param_name = param_name
        self.index = index
        self.out_features, self.in_features = self.weight.shape
        self.routed_tokens = 0

    @property
    def input_quantizer(self) -> nn.Module:
        """This expert's input quantizer (``<param>_input_quantizers[index]`` of the experts module)."""
        return getattr(self._owner, f"{self.param_name}_input_quantizers")[self.index]

    @property
    def weight_quantizer(self) -> nn.Module:
        """This expert's weight quantizer (``<param>_weight_quantizers[index]`` of the experts module)."""
        return getattr(self._owner, f"{self.param_name}_weight_quantizers")[self.index]

    @property
    def weight(self) -> torch.Tensor:
        """This expert's weight as a view in ``nn.Linear`` layout (writes go to the fused parameter)."""
        w = getattr(self._owner, self.param_name)[self.index]
        return w.t() if getattr(self._owner, "is_transposed", False) else w

    @property
    def bias(self) -> torch.Tensor | None:
        """This expert's bias, or None when the experts have none."""
        bias = getattr(self._owner, f"{self.param_name}_bias", None)
        if not getattr(self._owner, "has_bias", bias is not None) or bias is None:
            return None
        return bias[self.index]

    @property
    def calibrating(self) -> bool:
        """True while quant-core collects statistics through this projection's input quantizer."""
        return bool(getattr(self.input_quantizer, "_if_calib", False))

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: Any = _OWN
    ) -> torch.Tensor:
        """Quantized ``F.linear`` of this expert (``weight`` / ``bias``: the tensors the experts
        module's own forward passed, for modules that are not transformers' decorated classes)."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is _OWN else bias
        return _F_LINEAR(self.input_quantizer(x), self.weight_quantizer(weight), bias)

    def extra_repr(self) -> str:
        return f"{self.param_name}[{self.index}]"


class ExpertsQuantizerView:
    """ModelOpt's single ``<param>_input_quantizer`` of fused experts, over the per-expert ones here.

    Reading an attribute returns the experts' common value (an error names the experts that differ);
    setting one sets it on every expert's quantizer; methods (``enable()``, ``disable()``,
    ``reset_amax()``, ...) run on each.
    """

    def __init__(self, name: str, quantizers: nn.ModuleList) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_quantizers", quantizers)

    def __len__(self) -> int:
        return len(self._quantizers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._quantizers)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        values = [getattr(q, attr) for q in self._quantizers]
        if callable(values[0]) and not isinstance(values[0], (torch.Tensor, nn.Module)):

            def each(*args: Any, **kwargs: Any) -> Any:
                results = [fn(*args, **kwargs) for fn in values]
                return None if all(r is None for r in results) else results

            return each
        first = values[0]
        for e, value in enumerate(values[1:], 1):
            same = (
                (value is None and first is None)
                or (
                    isinstance(first, torch.Tensor)
                    and isinstance(value, torch.Tensor)
                    and first.shape == value.shape
                    and torch.equal(first, value.to(first.device))
                )
                or (not isinstance(first, torch.Tensor) and value == first)
            )
            if not same:
                raise ValueError(
                    f"{self._name}: the experts' input quantizers differ in {attr!r} (expert 0 "
                    f"and expert {e}); read {self._name}s[e].{attr} for one expert (quant keeps "
                    "one input quantizer per expert, with one shared amax after calibration)"
                )
        return first

    def __setattr__(self, attr: str, value: Any) -> None:
        for q in self._quantizers:
            setattr(q, attr, value)

    def __repr__(self) -> str:
        return f"ExpertsQuantizerView({self._name}, {len(self)} experts)"


class QuantFusedExperts(QuantModule):
    """Mixin for fused-experts classes: per-expert quantizers under ModelOpt's names and a routed
    forward (transformers' ``use_experts_implementation`` classes) that applies them."""

    def _setup(self) -> None:
        up = (
            "gate_up_proj"
            if getattr(self, "has_gate", True) and _is_3d(self, "gate_up_proj")
            else "up_proj"
        )
        self._first_proj_attr = up  # ModelOpt's attribute name (its exporters read it)
        n = self.num_experts
        for param in (up, "down_proj"):
            self.add_module(
                f"{param}_input_quantizers",
                nn.ModuleList(TensorQuantizer(INPUT_DEFAULT) for _ in range(n)),
            )
            self.add_module(
                f"{param}_weight_quantizers",
                nn.ModuleList(TensorQuantizer(WEIGHT_DEFAULT) for _ in range(n)),
            )
        self.quant_up_proj = nn.ModuleList(ExpertProjection(self, up, e) for e in range(n))
        self.quant_down_proj = nn.ModuleList(
            ExpertProjection(self, "down_proj", e) for e in range(n)
        )

    def _input_view(self, param: str) -> ExpertsQuantizerView:
        if param != "down_proj" and param != self._first_proj_attr:
            raise AttributeError(
                f"{type(self).__name__} has no {param}_input_quantizer (its first projection is "
                f"{self._first_proj_attr})"
            )
        return ExpertsQuantizerView(
            f"{param}_input_quantizer", getattr(self, f"{param}_input_quantizers")
        )

    @property
    def gate_up_proj_input_quantizer(self) -> ExpertsQuantizerView:
        """All experts' gate/up input quantizers as ModelOpt's one ``gate_up_proj_input_quantizer``."""
        return self._input_view("gate_up_proj")

    @property
    def up_proj_input_quantizer(self) -> ExpertsQuantizerView:
        """All experts' up input quantizers as ModelOpt's one ``up_proj_input_quantizer`` (no gate)."""
        return self._input_view("up_proj")

    @property
    def down_proj_input_quantizer(self) -> ExpertsQuantizerView:
        """All experts' down input quantizers as ModelOpt's one ``down_proj_input_quantizer``."""
        return self._input_view("down_proj")

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


class QuantGenericFusedExperts(QuantFusedExperts):
    """Fused experts that are not transformers' decorated classes: the module's own forward runs,
    and each ``F.linear`` on an expert's slice of ``gate_up_proj`` / ``up_proj`` / ``down_proj``
    (recognised by its storage, as ModelOpt recognises it) goes through that expert's
    :class:`ExpertProjection`; any other ``F.linear`` is left alone."""

    def _projection_of(self, weight: torch.Tensor) -> ExpertProjection | None:
        for projections, name in (
            (self.quant_up_proj, self._first_proj_attr),
            (self.quant_down_proj, "down_proj"),
        ):
            param = getattr(self, name)
            index = slice_index(weight, param, param.stride(0))
            if (
                index is not None
                and index < len(projections)
                and weight.numel() == param[0].numel()
            ):
                return projections[index]
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original forward, with its per-expert ``F.linear`` calls quantized."""

        hits = 0

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
            nonlocal hits
            projection = self._projection_of(weight)
            if projection is None:
                return _F_LINEAR(x, weight, bias)
            hits += 1
            if projection.param_name != "down_proj" and projection.calibrating:
                projection.routed_tokens += int(x.reshape(-1, x.shape[-1]).shape[0])
            return projection(x, weight, bias)

        original = F.linear
        F.linear = linear
        try:
            out = super(QuantFusedExperts, self).forward(*args, **kwargs)
        finally:
            F.linear = original
        if not hits and any(q.is_enabled for q in self._expert_quantizers()):
            raise RuntimeError(
                f"{type(self).__name__}: its forward ran no F.linear on an expert's slice of "
                f"{self._first_proj_attr} / down_proj (torch.bmm, matmul or a fused kernel?), so its "
                "enabled expert quantizers would never apply; disable them (e.g. "
                "{'quantizer_name': '*experts*', 'enable': False}) or register a quantized class "
                "for it with mtq.register"
            )
        return out

    def _expert_quantizers(self) -> Iterator[nn.Module]:
        for param in (self._first_proj_attr, "down_proj"):
            for kind in ("input", "weight"):
                yield from getattr(self, f"{param}_{kind}_quantizers")


def _is_3d(module: nn.Module, name: str) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, torch.Tensor) and value.dim() == 3


def fused_experts_layout(module: nn.Module) -> str | None:
    """The first projection's parameter name (``gate_up_proj`` or ``up_proj``) when ``module`` holds
    fused experts as ModelOpt 0.47 detects them, else None: a ``num_experts`` attribute and a 3-D
    ``down_proj``, with a 3-D ``gate_up_proj``, or a 3-D ``up_proj`` and neither ``gate_proj`` nor
    ``gate_up_proj``."""
    if not hasattr(module, "num_experts") or not _is_3d(module, "down_proj"):
        return None
    if _is_3d(module, "gate_up_proj"):
        return "gate_up_proj"
    if (
        _is_3d(module, "up_proj")
        and getattr(module, "gate_proj", None) is None
        and getattr(module, "gate_up_proj", None) is None
    ):
        return "up_proj"
    return None


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
    """The quantized class for a fused-experts class (created once, named ``Quant<Name>``):
    the routed forward here for transformers' decorated classes, the class's own forward with its
    per-expert ``F.linear`` calls quantized for any other."""
    mixin = QuantFusedExperts if is_fused_experts_class(original) else QuantGenericFusedExperts
    return quantized_subclass(
        mixin,
        original,
        __name__,
        f"{original.__name__} with per-expert input and weight quantizers (ModelOpt's names).",
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
        is_fused_experts_class(type(m))
        or isinstance(m, QuantFusedExperts)
        or fused_experts_layout(m) is not None
        for m in model.modules()
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

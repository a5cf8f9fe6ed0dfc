"""Layer-by-layer (sequential) calibration of models built from a stack of repeated blocks.

ModelOpt 0.47's ``layerwise`` algorithm option (``{"method": "gptq", "layerwise": {"enable":
True}}``, or ``"layerwise": True``): the calibration algorithm runs on one decoder layer at a
time, on that layer's inputs, so only one layer's statistics (and, with offloaded weights, one
layer's weights) are live at once.

Each step runs the user's ``forward_loop`` through the whole model with the decoder layers
patched: layers already done return placeholders on the ``meta`` device (no work), the layer just
calibrated replays its recorded inputs to produce the real hidden states, and the next layer
records its inputs (positional and keyword, so masks and position embeddings the parent builds
come along) and stops the forward pass. The parent model's code therefore runs as usual; a parent
that computes on the hidden states between layers is not supported (the placeholders say so).
The first pass runs through the whole model in float (quantizers off) and keeps the shapes of
its outputs; a stopped pass returns them as ``meta`` tensors, so a ``forward_loop`` that reads
``.logits`` or ``.loss`` of what the model returns keeps working (``.item()`` on them cannot). In
that pass only the first decoder layer computes: when its output is one tensor, the layers after it
return that tensor (the same shape as theirs), since nothing but shapes is kept.

``get_qdq_activations_from_prev_layer`` (default False, True for ``gptq`` as in ModelOpt):
False feeds the next layer the outputs of this layer before it is calibrated, computed as a
whole-model calibration pass computes them (weights fake-quantized with their max calibration,
activations not quantized), so ``max`` gives the same quantizer state as without ``layerwise``;
True feeds it the outputs after calibration, fully quantized (and with any weights
GPTQ/AWQ/SmoothQuant changed), so later layers see, and GPTQ compensates, earlier errors.
Enabled quantizers outside the decoder layers (e.g. an LM head) are calibrated at the end by one
more pass in which the last layer replays its inputs.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_core.algorithms.statistics import calibrate_weights, weight_quantizers
from quant_core.model_tools import quantizers_disabled
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer
from quant_core.offload import weights_materialized

__all__ = [
    "LayerActivationCollector",
    "LayerwiseOptions",
    "decoder_layers",
    "find_decoder_layers",
    "layerwise_calibrate",
    "split_layerwise",
]

ForwardLoop = Callable[[nn.Module], Any]
Algorithm = Callable[..., None]
_GPTQ_METHODS = ("gptq", "awq_gptq")  # their layers compensate the errors of earlier ones


@dataclass(frozen=True)
class LayerwiseOptions:
    """The ``layerwise`` algorithm option (ModelOpt's ``LayerwiseConfig`` fields quant implements)."""

    enable: bool = False
    get_qdq_activations_from_prev_layer: bool = False
    when_stacked: bool = False
    """Set by ``"layerwise": "auto"``: models without a decoder stack are calibrated whole."""


def split_layerwise(
    method: str, options: dict[str, Any]
) -> tuple[dict[str, Any], LayerwiseOptions]:
    """Take the ``layerwise`` entry out of an algorithm's options and validate it.

    It may be a bool or a dict of ``enable`` and ``get_qdq_activations_from_prev_layer`` (default
    True for the GPTQ algorithms ``gptq`` and ``awq_gptq``, False otherwise); ModelOpt's
    ``checkpoint_dir``, ``save_every`` and ``calib_mutates_weights`` (resumable runs) are refused
    by name. ``"auto"`` (quant's, used by the INT4 AWQ presets) is ``True`` with quantized
    activations from the previous layer on models that have a decoder stack, and calibrates other
    models whole.
    """
    options = dict(options)
    raw = options.pop("layerwise", None)
    if raw is None or raw is False:
        return options, LayerwiseOptions()
    if raw == "auto":
        return options, LayerwiseOptions(True, True, when_stacked=True)
    spec = {"enable": True} if raw is True else raw
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise ValueError(f"layerwise must be a bool or a dict, got {raw!r}")
    allowed = {"enable", "get_qdq_activations_from_prev_layer"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(
            f"layerwise option(s) {unknown} are not implemented here (resumable per-layer "
            f"checkpoints are not provided); allowed: {sorted(allowed)}"
        )
    for key, value in spec.items():
        if not isinstance(value, bool):
            raise ValueError(f"layerwise.{key} must be a bool, got {value!r}")
    qdq = spec.get("get_qdq_activations_from_prev_layer", method in _GPTQ_METHODS)
    return options, LayerwiseOptions(spec.get("enable", False), qdq)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: what a discoverer registered with
    :meth:`LayerActivationCollector.register_decoder_layer_support` finds, else of the
    ``nn.ModuleList``s whose children all share one class, the one holding the most parameters
    (``model.layers`` of a Hugging Face decoder)."""
    best = LayerActivationCollector.get_decoder_layers(model)
    if best is None:
        raise ValueError(
            f"Layerwise calibration requires a model with a stack of decoder layers (an "
            f"nn.ModuleList of one layer class); {type(model).__name__} has none"
        )
    return best


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """:func:`decoder_layers`, or None when the model has no such stack."""
    best, best_size = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    return best


class LayerActivationCollector:
    """ModelOpt's layer-input collector for layer-by-layer calibration.

    Finds a model's decoder layers (discoverers registered with
    :meth:`register_decoder_layer_support` first, then the built-in rule of
    :func:`find_decoder_layers`) and, between :meth:`_patch_all_layers` and
    :meth:`_unpatch_all_layers`, returns the inputs of each layer in turn with
    :meth:`get_input_activations`: each call runs ``forward_loop`` through the model with the
    layers before the previous one skipped (meta placeholders), the previous one replaying its
    recorded inputs, and the requested layer recording its ``(args, kwargs)`` and stopping the
    pass. Layers must be asked for in order, from the first.
    """

    _decoder_layer_support: ClassVar[list[tuple[Callable[..., bool], Callable[..., Any]]]] = []

    def __init__(
        self, model: nn.Module, status_callback: Callable[[str], None] | None = None
    ) -> None:
        self.model = model
        self.status_callback = status_callback
        self._seq: _Sequencer | None = None
        self._patch_ctx: Any = None

    @staticmethod
    def get_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
        """The decoder layers of ``model``: the first registered discoverer whose support check
        passes and that finds them, else the built-in rule; None when there are none."""
        for is_supported, discoverer in LayerActivationCollector._decoder_layer_support:
            if is_supported(model):
                layers = discoverer(model)
                if layers is not None:
                    return layers
        return find_decoder_layers(model)

    @staticmethod
    def is_supported(model: nn.Module) -> bool:
        """True when :meth:`get_decoder_layers` finds decoder layers in ``model``."""
        return LayerActivationCollector.get_decoder_layers(model) is not None

    @classmethod
    def register_decoder_layer_support(
        cls, is_supported: Callable[[nn.Module], bool], discoverer: Callable[[nn.Module], Any]
    ) -> None:
        """Add a ``(support check, discoverer)`` pair (once: registering it again does nothing)."""
        entry = (is_supported, discoverer)
        if entry not in cls._decoder_layer_support:
            cls._decoder_layer_support.append(entry)

    def _patch_all_layers(self, decoder_layers: nn.ModuleList | None = None) -> None:
        """Patch the decoder layers (found by :meth:`get_decoder_layers` when not given)."""
        if self._seq is not None:
            raise RuntimeError("LayerActivationCollector: the layers are already patched")
        layers = decoder_layers if decoder_layers is not None else decoder_layers_of(self.model)
        self._seq = _Sequencer(self.model, layers, None)  # type: ignore[arg-type]
        self._patch_ctx = self._seq.patched()
        self._patch_ctx.__enter__()

    def _unpatch_all_layers(self) -> None:
        """Restore the layers' and the model's own forwards."""
        if self._patch_ctx is not None:
            self._patch_ctx.__exit__(None, None, None)
        self._seq = self._patch_ctx = None

    def get_input_activations(
        self, layer: nn.Module, forward_loop: ForwardLoop
    ) -> list[tuple[tuple, dict]]:
        """The ``(args, kwargs)`` each batch of ``forward_loop`` gives ``layer``, one per batch."""
        seq = self._seq
        if seq is None:
            raise RuntimeError("LayerActivationCollector: call _patch_all_layers() first")
        index = next((i for i, m in enumerate(seq.layers) if m is layer), None)
        if index is None:
            raise ValueError(f"{type(layer).__name__} is not one of the model's decoder layers")
        for earlier in range(index - 1):
            if seq.states[earlier].mode != "skip":
                seq.finish(earlier)
        seq.forward_loop = forward_loop
        if self.status_callback is not None:
            self.status_callback(f"collecting the inputs of decoder layer {index}")
        return seq.inputs_of(index)


def decoder_layers_of(model: nn.Module) -> nn.ModuleList:
    """:func:`decoder_layers` (named apart for :class:`LayerActivationCollector`)."""
    return decoder_layers(model)


class _StopForward(Exception):
    """Raised by the capturing layer to end a forward pass early; the model's patched forward
    turns it into a ``None`` return."""


@dataclass
class _Layer:
    mode: str = "original"  # original | skip | run | capture | record | echo
    recorded: list[tuple[tuple, dict]] = field(default_factory=list)
    replay: deque = field(default_factory=deque)
    output_meta: Any = None


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The layer's keyword inputs without a KV cache: replaying a layer must not append its keys
    and values to the cache of the pass that recorded them (one pass over the whole sequence
    attends to the same keys with or without an empty cache)."""
    return {k: None if k in _CACHE_KWARGS else v for k, v in kwargs.items()}


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _to_meta(value: Any) -> Any:
    """The same structure with every tensor as a ``meta`` tensor of its shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _meta_output(value: Any) -> Any:
    """A model output (tensor, tuple, dict, ``ModelOutput``) with ``meta`` tensors of the same
    shapes, and no other object (a KV cache holds real tensors: it becomes None)."""
    if isinstance(value, (torch.Tensor, tuple, list)):
        return _to_meta(value)
    if isinstance(value, Mapping):
        return type(value)(**{k: _meta_output(v) for k, v in value.items()})
    return value if isinstance(value, (int, float, str, bool, type(None))) else None


class _Sequencer:
    """Patches the decoder layers and the model for skip / run / capture passes (see module doc)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, forward_loop: ForwardLoop):
        self.model, self.layers, self.forward_loop = model, layers, forward_loop
        self.states = [_Layer() for _ in layers]
        self._saved: list[tuple[nn.Module, Any]] = []
        self.outputs: list[Any] = []  # per batch: the model's output on meta tensors
        self._batch = 0
        self._first_output: Any = None  # the first layer's output in the batch of the first pass

    @contextmanager
    def patched(self) -> Iterator[None]:
        for module, state in zip(self.layers, self.states):
            self._patch(module, self._layer_forward(module, state))
        self._patch(self.model, self._model_forward(self.model))
        try:
            yield
        finally:
            for module, previous in reversed(self._saved):
                del module.forward
                if previous is not None:
                    module.forward = previous
            self._saved.clear()

    def _patch(self, module: nn.Module, forward: Callable) -> None:
        self._saved.append((module, vars(module).get("forward")))
        module.forward = forward

    def _layer_forward(self, module: nn.Module, state: _Layer) -> Callable:
        inner = module.forward  # the class forward, or accelerate's hook wrapper

        def forward(*args: Any, **kwargs: Any) -> Any:
            if state.mode == "skip":
                return _to_meta(state.output_meta)
            if state.mode in ("capture", "record"):
                state.recorded.append((args, without_cache(kwargs)))
                if state.mode == "capture":
                    raise _StopForward
            if state.mode == "echo" and isinstance(self._first_output, torch.Tensor):
                return self._first_output
            if state.mode == "run":
                if not state.replay:
                    raise RuntimeError(
                        "layerwise calibration: forward_loop ran more batches than on its first "
                        "call; it must run the same batches in the same order every time"
                    )
                args, kwargs = state.replay.popleft()
                out = inner(*args, **kwargs)
                state.output_meta = _to_meta(out)
                return out
            out = inner(*args, **kwargs)
            if state.mode == "record":
                self._first_output = out
            return out

        return forward

    def _model_forward(self, model: nn.Module) -> Callable:
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            batch, self._batch = self._batch, self._batch + 1
            try:
                out = inner(*args, **kwargs)
            except _StopForward:  # what the first pass returned, shapes only (.logits, .loss)
                return self.outputs[batch] if batch < len(self.outputs) else None
            if self.states[0].mode == "record":
                self.outputs.append(_meta_output(out))
            return out

        return forward

    def inputs_of(self, index: int) -> list[tuple[tuple, dict]]:
        """Run ``forward_loop`` with layer ``index`` recording its inputs; returns them per batch.

        Layer ``index - 1`` replays its recorded inputs, earlier layers are skipped."""
        if index > 0:
            prev = self.states[index - 1]
            prev.mode, prev.replay = "run", deque(prev.recorded)
        target = self.states[index]
        # the first pass runs through the model (recording its outputs' shapes for the later
        # passes, so a forward_loop may read .logits or .loss); later passes stop at the target
        # layer. Only shapes are kept, so in the first pass the layers after the first one return
        # its output (same shape) instead of computing theirs, when that output is one tensor.
        target.mode, target.recorded = ("record" if index == 0 else "capture"), []
        if index == 0:
            for state in self.states[1:]:
                state.mode = "echo"
        self._batch = 0
        with quantizers_disabled(self.model) if index == 0 else nullcontext():
            self.forward_loop(self.model)
        if index == 0:
            self._first_output = None
            for state in self.states[1:]:
                state.mode = "original"
        if index > 0:
            self._check_replayed(prev)
        target.mode = "original"
        if not target.recorded:
            raise RuntimeError(
                "layerwise calibration: forward_loop never reached decoder layer "
                f"{index}; it must call the model on the calibration batches"
            )
        return target.recorded

    def finish(self, index: int) -> None:
        """Layer ``index`` is done: later passes skip it and its recorded inputs are dropped."""
        state = self.states[index]
        state.mode, state.recorded, state.replay = "skip", [], deque()

    def through_last(self, _model: nn.Module) -> None:
        """A forward loop for the modules outside the stack: ``forward_loop`` with every layer
        skipped but the last, which replays its recorded inputs (so what follows sees real data)."""
        last = self.states[-1]
        last.mode, last.replay = "run", deque(last.recorded)
        self._batch = 0
        self.forward_loop(self.model)
        self._check_replayed(last)

    @staticmethod
    def _check_replayed(state: _Layer) -> None:
        if state.replay:
            raise RuntimeError(
                "layerwise calibration: forward_loop ran fewer batches than on its first call; "
                "it must run the same batches in the same order every time"
            )
        state.mode = "original"


@contextmanager
def as_in_one_pass(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module`` computes as in a whole-model calibration pass: its weights
    fake-quantized with their max calibration, its other quantizers passing inputs through."""
    calibrate_weights(module)
    with quantizers_disabled(module, keep=weight_quantizers(module)):
        yield


def replay(inputs: list[tuple[tuple, dict]], outputs: list[Any] | None = None) -> ForwardLoop:
    """A forward loop running a layer on its recorded ``(args, kwargs)`` batches; ``outputs`` (a
    list) keeps what each call returns."""

    def loop(layer: nn.Module) -> None:
        for args, kwargs in inputs:
            out = layer(*args, **kwargs)
            if outputs is not None:
                outputs.append(out)

    return loop


def _outside(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Modules with enabled quantizers of their own outside the decoder layers, outermost first."""
    inside = {id(m) for m in layers.modules()}
    found: list[nn.Module] = []
    for module in model.modules():
        if id(module) in inside or isinstance(module, (TensorQuantizer, SequentialQuantizer)):
            continue
        own = [
            q
            for c in module.children()
            if isinstance(c, (TensorQuantizer, SequentialQuantizer))
            for q in c.modules()
            if isinstance(q, TensorQuantizer) and q.is_enabled
        ]
        if own and not any(m in found for m in _ancestors(model, module)):
            found.append(module)
    return found


def _ancestors(model: nn.Module, target: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m is not target and any(c is target for c in m.modules())]


def layerwise_calibrate(
    model: nn.Module,
    algorithm: Algorithm,
    forward_loop: ForwardLoop,
    options: dict[str, Any],
    qdq_from_prev: bool,
    layer_done: Callable[[str, Callable[[], Any]], None] | None = None,
) -> None:
    """Run ``algorithm(module, loop, **options)`` on each decoder layer in turn (see the module doc).

    ``layer_done(prefix, probe)`` is called with each layer's name plus a dot once it is
    calibrated, before the next layer's inputs are computed from it; ``probe()`` runs the layer on
    its first recorded batch."""
    if forward_loop is None:
        raise ValueError("layerwise calibration needs a forward_loop to capture layer inputs")
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    seq = _Sequencer(model, layers, forward_loop)
    with seq.patched():
        inputs = seq.inputs_of(0)
        for index in tqdm(range(len(layers)), desc="layerwise", leave=False):
            layer, last = layers[index], index + 1 == len(layers)
            with weights_materialized(layer):
                if not last and not qdq_from_prev:
                    with as_in_one_pass(layer):
                        following = seq.inputs_of(index + 1)
                algorithm(layer, replay(inputs), **options)
                if layer_done is not None:
                    args, kwargs = inputs[0]
                    layer_done(f"{names[id(layer)]}.", functools.partial(layer, *args, **kwargs))
                if not last and qdq_from_prev:
                    following = seq.inputs_of(index + 1)
            if not last:
                seq.finish(index)
                inputs = following
        rest = _outside(model, layers)
        if rest:
            seq.states[-1].recorded = inputs
            with ExitStack() as stack:
                stack.enter_context(weights_materialized(layers[-1]))
                if not qdq_from_prev:
                    stack.enter_context(as_in_one_pass(layers[-1]))
                for module in rest:
                    with weights_materialized(module):
                        algorithm(module, seq.through_last, **options)
        seq.finish(len(layers) - 1)

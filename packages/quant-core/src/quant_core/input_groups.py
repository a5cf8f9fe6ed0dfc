"""Which quantized layers read the very same input tensor (q/k/v, gate/up), found during calibration.

Engines run such layers as one fused GEMM, so they must share the scales that GEMM applies; folding
a pre-quant scale into the producer of that input (a norm) needs the producer too. Both facts are
seen, not guessed: while :func:`quant_core.calibrate` runs, :class:`InputRecorder` notes with
pre-forward hooks which linear-like quantized module (one with an ``input_quantizer`` and a
``weight``) receives the tensor that the previous one received, and with forward hooks which norm
produced it. A layer belongs to a group only if it shared its input with the group's first reader in
every batch. The record lives on the model (:func:`input_groups`, :func:`set_record`), travels
with :func:`quant_core.quantizer_state` and is read by every algorithm step and exporter; nobody
matches layer names or runs an extra forward pass to find groups.

Modules may also declare sibling sets that read different tensors but run as one engine call (the
experts of an MoE layer) with a ``sibling_input_groups()`` method returning lists of child names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant_core.diagnostics import QuantWarning

__all__ = [
    "InputGroup",
    "InputRecorder",
    "input_groups",
    "is_norm",
    "record_input_groups",
    "recording_input_groups",
]

_RECORD_ATTR = "_quant_input_record"
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


@dataclass(frozen=True)
class InputGroup:
    """Layers (names from the model root) that read one tensor; ``producer`` is the norm that made it."""

    members: tuple[str, ...]
    producer: str | None = None
    siblings: bool = False
    """True for a declared sibling set (MoE experts): separate inputs, one engine call."""


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm / RMSNorm (or a class named like one with a 1-D ``weight``)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, _NORM_TYPES) or (
        type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def _reads_input(module: nn.Module) -> bool:
    return isinstance(getattr(module, "input_quantizer", None), nn.Module) and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


@dataclass
class _Seen:
    sources: set[str | None] = field(default_factory=set)
    producers: set[str | None] = field(default_factory=set)


class InputRecorder:
    """Pre-forward hooks noting, for each layer, which layer read the same tensor first and which
    norm produced it; :meth:`record` turns what was seen into groups."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model  # None: only :meth:`note` / :meth:`sources` (hooks placed by the caller)
        self._seen: dict[str, _Seen] = {}
        self._last: torch.Tensor | None = None
        self._owner: str | None = None
        self._made: tuple[torch.Tensor, str] | None = None  # the last norm output only
        self._foreign: dict[str, set[str]] = {}  # norm -> other modules handed its output
        self._sample: tuple[tuple, dict[str, Any]] | None = None  # the first batch the model ran
        self._handles: list[Any] = []

    def note(self, name: str, x: torch.Tensor) -> bool:
        """Record that layer ``name`` read ``x``; True when ``x`` is the very tensor the previous
        reader read (what a statistics pass may reuse). A pass that hooks layers itself calls this
        from its pre-forward hooks (without :meth:`attach`), then reads :meth:`sources`."""
        seen = self._seen.setdefault(name, _Seen())
        if self._last is x:
            if self._owner != name:  # a layer called twice on its input is no new reader
                seen.sources.add(self._owner)
            return True
        seen.sources.add(None)
        made = self._made
        seen.producers.add(made[1] if made is not None and made[0] is x else None)
        self._last, self._owner = x, name
        return False

    def _before(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.note(name, args[0])

        return hook

    def _after(self, name: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self._made = (out, name)

        return hook

    def _handed(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if name == "" and self._sample is None:
                self._sample = (args, dict(kwargs))
            made = self._made
            if made is not None and any(v is made[0] for v in (*args, *kwargs.values())):
                self._foreign.setdefault(made[1], set()).add(name)

        return hook

    def attach(self) -> None:
        """Install the hooks: on every linear-like quantized module (reads), every norm (produces)
        and every other module (is it handed a norm's output, e.g. as a post-norm residual?)."""
        siblings = {n for g in _declared_siblings(self.model) for n in g.members}
        for name, module in self.model.named_modules():
            if _reads_input(module) and name not in siblings:  # experts: declared, not seen
                self._handles.append(module.register_forward_pre_hook(self._before(name)))
                continue
            if is_norm(module):
                self._handles.append(module.register_forward_hook(self._after(name)))
            self._handles.append(
                module.register_forward_pre_hook(self._handed(name), with_kwargs=True)
            )

    def detach(self) -> None:
        """Remove the hooks and drop the references to tensors seen."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.release()

    def probe(self) -> Callable[[], Any] | None:
        """A function running the model on the first batch it ran while recorded (None if none)."""
        if self._sample is None:
            return None
        args, kwargs = self._sample
        return lambda: self.model(*args, **kwargs)

    def release(self) -> None:
        """Forget the tensors seen so far (between passes), keeping what was learned."""
        self._last, self._owner, self._made = None, None, None

    def sources(self) -> dict[str, str]:
        """Layer -> the layer that read the same tensor right before it, for the layers that did
        so in every batch seen."""
        return {
            name: next(iter(seen.sources))
            for name, seen in self._seen.items()
            if len(seen.sources) == 1 and None not in seen.sources
        }

    def groups(self) -> list[InputGroup]:
        """The groups seen so far: each layer that always read a tensor first, with the layers that
        always read that same tensor right after it, and its producer when always the same norm."""
        first_of = self.sources()
        heads = [n for n in self._seen if n not in first_of]
        found = []
        for head in heads:
            members = (head, *(n for n, first in first_of.items() if first == head))
            producers = self._seen[head].producers
            producer = next(iter(producers)) if len(producers) == 1 else None
            if producer is not None and not self._only_readers(producer, members):
                producer = None  # its output goes elsewhere too: scaling it would change that
            found.append(InputGroup(members, producer))
        return found

    def _only_readers(self, producer: str, members: tuple[str, ...]) -> bool:
        """True when every module handed ``producer``'s output holds a member (the attention or
        MLP block that passes it on) or is part of one (its input quantizer); a post-norm block's
        residual branch is not."""
        return all(
            c == "" or any(m.startswith(f"{c}.") or c.startswith(f"{m}.") for m in members)
            for c in self._foreign.get(producer, ())
        )

    def record(self) -> None:
        """Merge the groups seen into the model's record (layers seen again replace their entry)."""
        if self._seen:
            update_record(self.model, self.groups())


@contextmanager
def recording_input_groups(model: nn.Module) -> Iterator[InputRecorder]:
    """Within the block, forward passes through ``model`` are watched; on exit the groups seen are
    recorded on the model (see :func:`input_groups`)."""
    recorder = InputRecorder(model)
    recorder.attach()
    try:
        yield recorder
    finally:
        recorder.detach()
    recorder.record()


def forward_dummy(model: nn.Module) -> bool:
    """One forward pass on the model's ``dummy_inputs`` (transformers models have them); False (with
    a QuantWarning when the pass failed) when there are none or the weights are not materialized."""
    inputs = getattr(model, "dummy_inputs", None)
    params = list(model.parameters())
    if not isinstance(inputs, dict) or not params or any(p.is_meta for p in params):
        return False
    device = params[0].device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    try:
        with torch.no_grad():
            model(**inputs)
        return True
    except Exception as err:  # the record stays empty: scales of fused layers are not shared
        warnings.warn(
            f"{type(model).__name__}: a forward pass on its dummy_inputs failed ({err}); layers "
            "that read one input were not found, so their scales are not shared. Calibrate with "
            "a forward_loop, or call quant_core.record_input_groups(model, forward_loop).",
            QuantWarning,
            stacklevel=3,
        )
        return False


def record_input_groups(
    model: nn.Module, forward_loop: Callable[[nn.Module], Any] | None = None
) -> list[InputGroup]:
    """Record which layers read one input by running ``forward_loop(model)`` (default: one pass on
    ``model.dummy_inputs``) under :func:`recording_input_groups`; returns the groups recorded.

    Calibration does this by itself; call it for a model whose record is missing (restored from a
    save made before groups were recorded), then :func:`quant_core.make_deployable`."""
    training = model.training
    model.eval()
    try:
        with recording_input_groups(model), torch.no_grad():
            ran = forward_dummy(model) if forward_loop is None else (forward_loop(model), True)[1]
    finally:
        model.train(training)
    if not ran:
        raise ValueError(
            f"{type(model).__name__} has no dummy_inputs to find the layers that read one input; "
            "pass a forward_loop"
        )
    return input_groups(model)


def _declared_siblings(model: nn.Module) -> list[InputGroup]:
    found = []
    for name, module in model.named_modules():
        declare = getattr(module, "sibling_input_groups", None)
        if callable(declare):
            prefix = f"{name}." if name else ""
            found += [
                InputGroup(tuple(prefix + n for n in names), siblings=True)
                for names in declare()
                if len(names) > 1
            ]
    return found


def update_record(model: nn.Module, groups: list[InputGroup]) -> None:
    """Put ``groups`` into the model's record; earlier groups naming any of their layers are dropped."""
    new = {n for g in groups for n in g.members}
    kept = [g for g in _stored(model) if not new.intersection(g.members)]
    set_record(model, [*kept, *groups])


def _stored(model: nn.Module) -> list[InputGroup]:
    return list(getattr(model, _RECORD_ATTR, None) or [])


def has_record(model: nn.Module) -> bool:
    """True when calibration (or :func:`set_record`) recorded the model's input groups."""
    return getattr(model, _RECORD_ATTR, None) is not None


def set_record(model: nn.Module, groups: list[InputGroup]) -> None:
    """Store the model's input groups (what restore and calibration call)."""
    object.__setattr__(model, _RECORD_ATTR, tuple(groups))


def input_groups(model: nn.Module, *, prefix: str = "", siblings: bool = False) -> list[InputGroup]:
    """The recorded input groups of ``model`` whose layers are all under ``prefix`` (a module name
    ending in a dot, or ""); ``siblings`` adds the declared sibling sets (MoE experts)."""
    groups = _stored(model) + (_declared_siblings(model) if siblings else [])
    return [g for g in groups if all(n.startswith(prefix) for n in g.members)]


def record_to_json(model: nn.Module) -> list[dict[str, Any]] | None:
    """The recorded groups as JSON values (None when nothing was recorded)."""
    if not has_record(model):
        return None
    return [{"members": list(g.members), "producer": g.producer} for g in _stored(model)]


def record_from_json(model: nn.Module, value: list[dict[str, Any]] | None) -> None:
    """Restore what :func:`record_to_json` returned, checking that every layer exists."""
    if value is None:
        return
    names = {n for n, _ in model.named_modules()}
    groups = []
    for item in value:
        members = tuple(item["members"])
        missing = [n for n in members if n not in names]
        if missing:
            raise ValueError(f"recorded input group names layers the model lacks: {missing}")
        groups.append(InputGroup(members, item.get("producer")))
    set_record(model, groups)

"""Quantize a Hugging Face causal LM from its safetensors files one decoder layer at a time.

:class:`StreamedModel` builds the model from its ``config.json`` with every weight on the
``meta`` device (no memory), and :meth:`StreamedModel.quantize` then walks the decoder layers:
load one layer's weights from the checkpoint shards (in float32 on the compute device), calibrate
it on the outputs of the layers before it (:class:`quant_core.streamed.StreamedCalibration`: the
algorithms of the config, then :func:`quant_core.make_deployable`), hand it to ``write`` (e.g.
:class:`quant_export.streamed_checkpoint.StreamedCheckpoint`), and free it. The embeddings are
loaded only to compute the first layer's inputs, the final norm and LM head only at the end. Peak
memory is one decoder layer, the calibration activations and the embeddings, whatever the depth.

Held-apart windows (``eval_windows``) are carried through every layer twice, through the float
layer (before calibration) and through the quantized one, so the perplexities before and after
come out of the same pass without a second load.

The inputs each layer receives besides the hidden states (attention masks, rotary position
embeddings) are recorded once, by running the model's own forward with every decoder layer
replaced by the identity: the model's code builds them as it would for a whole-model pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["LayerState", "StreamedModel", "StreamedResult", "resolve_device"]

Write = Callable[[nn.Module, Callable[[str], bool], str], Any]
"""``write(model, scope, prefix)``: write the tensors of the modules ``scope`` selects."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / None: the first CUDA device when torch sees one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA device")
    return device


@dataclass
class StreamedResult:
    """What :meth:`StreamedModel.quantize` measured."""

    ppl: dict[str, float] = field(default_factory=dict)
    """``"float"`` and ``"quantized"`` perplexity of the held-apart windows (when given)."""
    ppl_tokens: int = 0
    methods: list[str] = field(default_factory=list)


@dataclass
class LayerState:
    """Where a streamed run stands before layer ``index``: the calibration hidden states (per
    batch) and the held-apart windows' float and quantized hidden states. Saved after every layer,
    it lets an interrupted run go on (``quant-export quantize --resume``)."""

    index: int
    hidden: list[torch.Tensor]
    eval_float: list[torch.Tensor] = field(default_factory=list)
    eval_quant: list[torch.Tensor] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the state to ``path`` (safetensors; a temporary file renamed into place)."""
        from safetensors.torch import save_file

        tensors = {
            f"{key}.{i}": t.contiguous()
            for key in ("hidden", "eval_float", "eval_quant")
            for i, t in enumerate(getattr(self, key))
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"index": str(self.index)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LayerState:
        """The state :meth:`save` wrote to ``path``."""
        from safetensors import safe_open

        lists: dict[str, list[torch.Tensor]] = {"hidden": [], "eval_float": [], "eval_quant": []}
        with safe_open(str(path), "pt") as f:
            index = int(f.metadata()["index"])
            keys = sorted(f.keys(), key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])))
            for key in keys:
                lists[key.rsplit(".", 1)[0]].append(f.get_tensor(key))
        return cls(index, **lists)


class _Stop(Exception):
    """Ends the recording pass after the last decoder layer."""


def _shard_map(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text("utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder}: no *.safetensors files; the streamed job reads safetensors checkpoints only"
        )
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _to(value: Any, device: torch.device, memo: dict[int, tuple] | None = None) -> Any:
    """``value`` (tensors in tuples, lists, dicts) on ``device``; ``memo`` copies a tensor handed
    several times once (it keeps the original alive, so its id is not reused)."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))
        return memo[id(value)][1]
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 8 << 20


def _map_large_allocations() -> None:
    """Have glibc map every allocation of 8 MiB and more on its own (returned to the system when
    freed). By default the threshold rises to 32 MiB after the first large free, and the per-layer
    activations and weights below it then fragment the heap: the peak grows layer after layer
    (measured: +45 MB a layer on a 2048-wide Llama; flat with 8 MiB, and 15% less CPU than 1 MiB,
    whose every temporary is a fresh mapping)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps the tensors of a freed layer,
    allocated below its mmap threshold, for reuse: RSS would grow with depth)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


def _embedded(recorded: list[tuple]) -> list[torch.Tensor]:
    """The hidden states the first decoder layer was handed, per batch."""
    return [args[0] if args else kwargs["hidden_states"] for args, kwargs in recorded]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class StreamedModel:
    """A Hugging Face causal LM in ``folder`` (config.json + safetensors), its weights on ``meta``.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``) is where each layer computes;
    the calibration activations wait on the CPU between layers."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str | torch.device | None = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from quant_core.layerwise import decoder_layers

        self.folder = Path(folder)
        self.device = resolve_device(device)
        _map_large_allocations()
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=trust_remote_code
            ).eval()
        if (self.folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.layers = decoder_layers(self.model)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        names = self._names
        self.prefixes = [f"{names[id(layer)]}." for layer in self.layers]
        self._files = _shard_map(self.folder)
        self._embeddings = self.model.get_input_embeddings()
        self._embedding_key = f"{names[id(self._embeddings)]}.weight"
        self._head = self.model.get_output_embeddings()
        self._tied_key = None
        tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
        head_key = f"{names[id(self._head)]}.weight" if self._head is not None else None
        if tied and head_key not in self._files:
            # loaded and freed apart; the checkpoint stores the input embedding only
            self._tied_key = head_key
            meta = torch.empty_like(self._head.weight)
            self._head.weight = nn.Parameter(meta, requires_grad=False)
        self._check_outside()

    @property
    def parts(self) -> int:
        """The number of parts :meth:`quantize` writes: one per decoder layer, one per other
        module holding weights (embeddings, final norm, an untied LM head)."""
        return len(self.layers) + len(self._written_ends())

    # -- weights ---------------------------------------------------------------------------------

    def _state_names(self, module: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
        """(checkpoint key, owner, leaf, is_parameter) of the tensors ``module`` loads."""
        out = []
        for owner in module.modules():
            base = self._names[id(owner)]
            for leaf, param in owner.named_parameters(recurse=False):
                if param.is_meta:
                    out.append((f"{base}.{leaf}" if base else leaf, owner, leaf, True))
            for leaf in owner._buffers:
                if leaf in owner._non_persistent_buffers_set:
                    continue
                buffer = owner._buffers[leaf]
                if buffer is not None and buffer.is_meta:
                    out.append((f"{base}.{leaf}" if base else leaf, owner, leaf, False))
        return out

    def load(self, module: nn.Module, dtype: torch.dtype | None = torch.float32) -> None:
        """Read the weights of ``module`` from the checkpoint onto the compute device, as ``dtype``
        (None: as stored). An output embedding tied to the input embedding reads its tensor."""
        from safetensors import safe_open

        wanted = [(self._source(k), o, leaf, p) for k, o, leaf, p in self._state_names(module)]
        missing = [key for key, *_ in wanted if key not in self._files]
        if missing:
            raise ValueError(
                f"{self.folder}: the checkpoint has no tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; its names differ from the model's (a checkpoint this streamed reader cannot "
                "map): quantize it without streaming"
            )
        by_file: dict[Path, list] = {}
        for item in wanted:
            by_file.setdefault(self._files[item[0]], []).append(item)
        for path, items in by_file.items():
            with safe_open(str(path), "pt", device="cpu") as f:
                for key, owner, leaf, is_param in items:
                    value = f.get_tensor(key)
                    expected = getattr(owner, leaf).shape
                    if value.shape != expected:
                        raise ValueError(
                            f"{path.name}: {key} has shape {tuple(value.shape)}, the model's "
                            f"config makes it {tuple(expected)}"
                        )
                    cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
                    value = value.to(self.device, cast)
                    if is_param:
                        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    else:
                        owner._buffers[leaf] = value

    def _source(self, key: str) -> str:
        """The checkpoint key holding ``key``: itself, or for an output embedding tied to the input
        embedding (and not stored), the input embedding's."""
        if key in self._files or key != self._tied_key:
            return key
        return self._embedding_key

    def free(self, module: nn.Module) -> None:
        """Put the weights of ``module`` back on ``meta`` (its quantizers' small state stays)."""
        from quant_core.nn import SequentialQuantizer, TensorQuantizer

        quantizers = {
            id(m)
            for q in module.modules()
            if isinstance(q, TensorQuantizer | SequentialQuantizer)
            for m in q.modules()
        }
        for owner in module.modules():
            if id(owner) in quantizers:
                continue
            for leaf, param in list(owner._parameters.items()):
                if param is not None and not param.is_meta:
                    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
                    owner._parameters[leaf] = nn.Parameter(meta, requires_grad=False)
            for leaf, buffer in list(owner._buffers.items()):
                persistent = leaf not in owner._non_persistent_buffers_set
                if buffer is not None and persistent and not buffer.is_meta:
                    owner._buffers[leaf] = torch.empty(
                        buffer.shape, dtype=buffer.dtype, device="meta"
                    )
        _return_freed_memory()

    @contextmanager
    def loaded(
        self, module: nn.Module, dtype: torch.dtype | None = torch.float32
    ) -> Iterator[nn.Module]:
        """``module`` with its weights loaded (as ``dtype``) within the block, freed after."""
        self.load(module, dtype)
        try:
            yield module
        finally:
            self.free(module)

    # -- the layers' inputs ----------------------------------------------------------------------

    def record_inputs(self, batches: list[dict[str, torch.Tensor]]) -> list[list[tuple]]:
        """Per decoder layer, per batch: the ``(args, kwargs)`` the model hands that layer (the
        hidden states are the embeddings' for every layer; the others are what matters)."""
        from quant_core.layerwise import without_cache

        recorded: list[list[tuple]] = [[] for _ in self.layers]
        cpu, memo = torch.device("cpu"), {}  # one CPU copy of what every layer is handed
        saved = []
        for index, layer in enumerate(self.layers):

            def identity(*args: Any, _index: int = index, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                kwargs = without_cache(kwargs)
                if _index:  # later layers get their hidden states from the layer before
                    args, kwargs = _with_hidden(args, kwargs, None)
                recorded[_index].append(_to((args, kwargs), cpu, memo))
                if _index == len(self.layers) - 1:
                    raise _Stop
                return hidden

            saved.append((layer, vars(layer).get("forward")))
            layer.forward = identity
        # the embeddings stay as stored; their output is cast to float32 (exact from bf16 / fp16)
        cast = self._embeddings.register_forward_hook(lambda _m, _a, out: out.float())
        with self.loaded(self._embeddings, None):
            try:
                with torch.no_grad():
                    for batch in batches:
                        try:
                            self.model(**_to(batch, self.device), use_cache=False)
                        except _Stop:
                            continue
                        raise RuntimeError(
                            f"{type(self.model).__name__} returned without running its last decoder "
                            "layer; it cannot be quantized layer by layer"
                        )
            finally:
                cast.remove()
                for layer, previous in saved:
                    del layer.forward
                    if previous is not None:
                        layer.forward = previous
        return recorded

    # -- the job ---------------------------------------------------------------------------------

    def quantize(
        self,
        config: dict[str, Any],
        batches: list[dict[str, torch.Tensor]],
        write: Write,
        *,
        eval_windows: torch.Tensor | None = None,
        progress: bool = True,
        start: LayerState | None = None,
        layer_done: Callable[[LayerState], None] | None = None,
    ) -> StreamedResult:
        """Quantize with ``config`` on calibration ``batches`` (dicts of model inputs), calling
        ``write(model, scope, prefix)`` once per decoder layer and once for each other module
        holding weights (:attr:`parts` calls in all).

        ``eval_windows`` (a LongTensor (n, seq_len)) gives the float and quantized perplexity.
        ``layer_done(state)`` is called after each layer is written; ``start`` (such a state) skips
        the layers before ``start.index`` and goes on from its hidden states."""
        from quant_core.model_tools import quantizers_disabled
        from quant_core.streamed import StreamedCalibration

        if not batches:
            raise ValueError("no calibration batches")
        result = StreamedResult()
        calib = StreamedCalibration(self.model, config)
        result.methods = calib.methods
        self._names = {id(m): n for n, m in self.model.named_modules()}  # with the quantizers
        self._check_quantized_inside()
        inputs = self.record_inputs(batches)
        evaluating = eval_windows is not None and len(eval_windows) > 0
        if evaluating:
            windows = [{"input_ids": w[None]} for w in eval_windows]
            eval_inputs = self.record_inputs(windows)
            eval_float = _embedded(eval_inputs[0])
            eval_quant = list(eval_float)
        hidden = _embedded(inputs[0])
        first = 0
        if start is not None:
            first, hidden = start.index, start.hidden
            if evaluating:
                eval_float, eval_quant = start.eval_float, start.eval_quant
            if len(hidden) != len(batches) or (evaluating and len(eval_float) != len(windows)):
                raise ValueError(
                    "the saved layer state holds other batches than this run's; start over"
                )
        bar = tqdm(
            total=len(self.layers), initial=first, desc="layers", unit="layer",
            disable=not progress,
        )  # fmt: skip
        with calib:
            for index, (layer, prefix) in enumerate(zip(self.layers, self.prefixes)):
                if index < first:
                    continue
                with self.loaded(layer):
                    bar.set_postfix_str(f"{prefix.rstrip('.')}: calibrate")
                    if evaluating:
                        with quantizers_disabled(layer):
                            eval_float = self._run(layer, eval_inputs[index], eval_float)
                    outputs = calib.calibrate_layer(
                        prefix, layer, list(self._on_device(inputs[index], hidden))
                    )
                    hidden = [_hidden(o).to("cpu") for o in outputs]
                    del outputs
                    if evaluating:
                        eval_quant = self._run(layer, eval_inputs[index], eval_quant)
                    bar.set_postfix_str(f"{prefix.rstrip('.')}: write")
                    write(self.model, _under(prefix), prefix)
                inputs[index] = []
                if layer_done is not None:
                    state = LayerState(index + 1, hidden)
                    if evaluating:
                        state.eval_float, state.eval_quant = eval_float, eval_quant
                    layer_done(state)
                bar.update(1)
        bar.close()
        if evaluating:
            norm = self._final_norm()
            with self.loaded(norm), self.loaded(self._head):
                result.ppl["float"] = self._perplexity(eval_float, eval_windows, norm)
                result.ppl["quantized"] = self._perplexity(eval_quant, eval_windows, norm)
            result.ppl_tokens = eval_windows.numel() - eval_windows.shape[0]
        names = self._names
        for module in self._written_ends():  # one at a time, as stored: no float32 copy
            scope = _own(names[id(module)])
            with self.loaded(module, None):
                if module is self._embeddings and self._tied_key is not None:
                    # the tied head goes with it, as in a whole-model export (a tied copy is not
                    # written; the head is listed as left float)
                    untied = self._head.weight
                    self._head.weight = module.weight
                    try:
                        write(self.model, _either(scope, _own(names[id(self._head)])), "")
                    finally:
                        self._head.weight = untied
                else:
                    write(self.model, scope, "")
        return result

    def _on_device(self, recorded: list[tuple], hidden: list[torch.Tensor]) -> Iterator[tuple]:
        """A layer's recorded ``(args, kwargs)`` per batch with ``hidden`` as its hidden states,
        each moved to the compute device as it is reached."""
        for (args, kwargs), h in zip(recorded, hidden):
            yield _to(_with_hidden(args, kwargs, h), self.device)

    def _run(self, layer: nn.Module, recorded: list[tuple], hidden: list[torch.Tensor]) -> list:
        """The layer's hidden-state outputs (on the CPU) for ``hidden``, one batch at a time."""
        return [
            _hidden(layer(*args, **kwargs)).to("cpu")
            for args, kwargs in self._on_device(recorded, hidden)
        ]

    def _written_ends(self) -> list[nn.Module]:
        """The modules outside the decoder stack holding weights of their own, outermost first
        (an output embedding tied to the input embedding is not written: loaders re-tie it)."""
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        return [
            m
            for m in self.model.modules()
            if id(m) not in inside
            and any(True for _ in m.parameters(recurse=False))
            and not (self._tied_key is not None and m is self._head)
        ]

    def _check_quantized_inside(self) -> None:
        """Refuse a config that quantizes a module outside the decoder layers (an LM head): its
        inputs are not calibrated layer by layer."""
        from quant_core.conversion import iter_tensor_quantizers

        stack = tuple(self.prefixes)
        outside = [
            n
            for n, q in iter_tensor_quantizers(self.model)
            if q.is_enabled and not n.startswith(stack)
        ]
        if outside:
            raise ValueError(
                f"the config quantizes {', '.join(outside[:3])} outside the decoder layers; the "
                "streamed job calibrates decoder layers only: leave those modules float "
                '(e.g. {"*lm_head*": {"enable": False}}) or quantize the whole model in memory'
            )

    def _check_outside(self) -> None:
        """Refuse a model holding parameters in its top module itself (no part to write them in)."""
        own = [n for n, _p in self.model.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"{type(self.model).__name__} holds parameter(s) {own} outside any submodule; "
                "it cannot be written layer by layer"
            )

    def _perplexity(
        self, hidden: list[torch.Tensor], windows: torch.Tensor, norm: nn.Module
    ) -> float:
        """exp(mean next-token NLL) of the final hidden states (final norm and LM head applied)."""
        from quant_llm.evaluation import next_token_nll

        total, tokens = 0.0, 0
        with torch.no_grad():
            for h, ids in zip(hidden, windows):
                ids = ids[None].to(self.device)
                total += next_token_nll(self._head(norm(h.to(self.device))), ids)
                tokens += ids[:, 1:].numel()
        return math.exp(total / tokens)

    def _final_norm(self) -> nn.Module:
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
        if norm is None:
            raise ValueError(
                f"{type(self.model).__name__}: no final norm found (model.norm); cannot compute "
                "the perplexity layer by layer (use eval windows 0)"
            )
        return norm


def _under(prefix: str) -> Callable[[str], bool]:
    return lambda name: name.startswith(prefix)


def _either(a: Callable[[str], bool], b: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda name: a(name) or b(name)


def _own(name: str) -> Callable[[str], bool]:
    """The module ``name`` and its own tensors (not its children's)."""
    return lambda key: key == name or key.rpartition(".")[0] == name

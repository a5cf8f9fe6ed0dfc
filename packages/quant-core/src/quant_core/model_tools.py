"""Model-level helpers from ModelOpt 0.47: per-quantizer error, temporary weight folding, no-argument loops."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from quant_core.conversion import iter_tensor_quantizers, preserve_quantizer_attributes_context
from quant_core.nn.modules.quant_rnn import QuantRNNBase
from quant_core.nn.quant_module import fold_into
from quant_core.nn.sequential import SequentialQuantizer
from quant_core.nn.tensor_quantizer import TensorQuantizer

Selector = str | Callable[[str], bool]


def model_loop(forward_loop: Callable[..., Any] | None) -> Callable[[nn.Module], Any] | None:
    """``forward_loop`` as a one-argument callable; a loop taking no argument is accepted (deprecated in ModelOpt)."""
    if forward_loop is None:
        return None
    try:
        params = inspect.signature(forward_loop).parameters.values()
    except (TypeError, ValueError):
        return forward_loop
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional or any(p.kind == p.VAR_POSITIONAL for p in params):
        return forward_loop
    warnings.warn(
        "forward_loop should take the model as its argument; a loop without arguments is "
        "deprecated (as in ModelOpt)",
        DeprecationWarning,
        stacklevel=3,
    )
    return lambda _model: forward_loop()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in eval mode for the block, then give each its own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def quantizers_disabled(model: nn.Module, keep: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Every enabled quantizer of ``model`` but those in ``keep`` passes its input through for the
    block (pre-quant scales still apply), then is enabled again."""
    kept = {id(q) for q in keep}
    enabled = [
        q
        for q in model.modules()
        if isinstance(q, TensorQuantizer) and q.is_enabled and id(q) not in kept
    ]
    for q in enabled:
        q.disable()
    try:
        yield
    finally:
        for q in enabled:
            q.enable()


def compute_quantization_mse(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], Any],
    wildcards: Selector | list[Selector] = "*",
) -> dict[str, float]:
    """Mean squared error between each matching quantizer's input and output, averaged over the batches.

    Disabled quantizers (and ones not quantizing) are left out of the result.
    """
    selectors = wildcards if isinstance(wildcards, list) else [wildcards]

    def matches(name: str) -> bool:
        return any(fnmatchcase(name, w) if isinstance(w, str) else w(name) for w in selectors)

    sums: dict[str, list[float]] = {}
    handles = []
    for name, q in iter_tensor_quantizers(model):
        if not matches(name) or not q.is_enabled or not q._if_quant:
            continue
        acc = sums.setdefault(name, [0.0, 0])

        def hook(_m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor, acc=acc) -> None:
            acc[0] += float(((inp[0].detach().double() - out.detach().double()) ** 2).mean())
            acc[1] += 1

        handles.append(q.register_forward_hook(hook))
    try:
        model_loop(forward_loop)(model)
    finally:
        for h in handles:
            h.remove()
    return {name: total / count for name, (total, count) in sums.items() if count}


def fold_weight(model: nn.Module) -> None:
    """Write fake-quantized weights into the parameters and turn the weight quantizers off.

    Outputs are unchanged and forward passes get faster; the folded model can no longer be
    calibrated again or trained with QAT on its original weights.
    """
    for module in model.modules():
        if isinstance(module, QuantRNNBase):  # one quantizer per weight matrix
            module.fold_weight()
            continue
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        if hasattr(module, "fold_weight"):
            module.fold_weight()
            continue
        fold_into(weight, quantizer)


@contextmanager
def temporarily_fold_weights(
    model: nn.Module, snapshot_device: torch.device | str | None = None
) -> Iterator[None]:
    """Fold fake-quantized weights for the block; weights (in place) and quantizers come back on exit.

    ``snapshot_device`` holds the weight copies (``"cpu"`` saves accelerator memory).
    """
    saved = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        if isinstance(quantizer, SequentialQuantizer):
            raise ValueError(
                f"temporarily_fold_weights does not support the SequentialQuantizer of {name}; "
                "it folds single-stage weight quantizers only"
            )
        if isinstance(quantizer, TensorQuantizer) and (
            quantizer.is_enabled or quantizer.pre_quant_scale is not None
        ):
            copy = weight.detach().to(snapshot_device or weight.device, copy=True)
            saved.append((weight, copy, quantizer, quantizer.pre_quant_scale))
    with preserve_quantizer_attributes_context(model):
        try:
            fold_weight(model)
            yield
        finally:
            with torch.no_grad():
                for weight, copy, quantizer, pre_quant_scale in saved:
                    weight.data.copy_(copy.to(weight.device))
                    quantizer.pre_quant_scale = pre_quant_scale
                    quantizer._weight_folded = False

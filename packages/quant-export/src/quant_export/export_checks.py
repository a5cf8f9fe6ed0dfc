"""Checks before an ONNX export: sample inputs the model accepts, and weights folded unquantized."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quant_core.conversion import iter_tensor_quantizers
from quant_core.diagnostics import name_list, warn

__all__ = ["run_on_sample", "warn_folded_weights"]


def _describe(args: tuple[Any, ...]) -> str:
    def one(v: Any) -> str:
        return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    if len(args) == 1 and isinstance(args[0], Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in args[0].items()) + "}"
    return "(" + ", ".join(one(a) for a in args) + ")"


def run_on_sample(model: nn.Module, args: tuple[Any, ...]) -> Any:
    """``model``'s output on the sample inputs; a failure names the inputs given and torch's complaint."""
    try:
        with torch.no_grad():
            if len(args) == 1 and isinstance(args[0], Mapping):
                return model(**args[0])
            return model(*args)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"export_onnx: {type(model).__name__} cannot run on sample_inputs {_describe(args)}: "
            f"{first}. Give inputs of the shape and dtype the model's forward takes (the batch "
            "size may differ: axis 0 is exported as dynamic)."
        ) from err


def warn_folded_weights(model: nn.Module) -> None:
    """Warn when weights were folded (``mtq.fold_weight``): the graph then stores them as float."""
    folded = [
        name.rpartition(".")[0]
        for name, q in iter_tensor_quantizers(model)
        if getattr(q, "_weight_folded", False) and not q.is_enabled
    ]
    if folded:
        shown = name_list(folded)
        warn(
            f"the weights of {shown} were folded (mtq.fold_weight), so their weight quantizers are "
            "off and the ONNX graph stores those weights as float32 (quantized values, but no "
            "int8/fp8 storage or weight Q/DQ). Export before fold_weight to store them quantized.",
            stacklevel=3,
        )

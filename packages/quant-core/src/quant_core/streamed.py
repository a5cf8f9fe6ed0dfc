"""Calibration of a model whose decoder layers the caller brings in one at a time.

:func:`quant_core.quantize` calibrates a model held whole. A model too large for that is built with
its weights on the ``meta`` device; the caller loads one decoder layer, hands it here with that
layer's recorded inputs, writes the layer out and frees it (``quant_llm.streamed`` does this for
Hugging Face checkpoints). Each layer goes through what ``layerwise`` calibration does to it (see
:mod:`quant_core.layerwise`): every algorithm of the config on the layer's inputs, then
:func:`quant_core.make_deployable` on the layer, and the inputs of the next layer computed either
as a whole-model calibration pass computes them (``max`` and the other single-pass algorithms: the
quantizer state is the one :func:`quant_core.quantize` reaches) or from the calibrated, quantized
layer (``gptq`` / ``awq_gptq``, and any algorithm whose ``layerwise`` option asks for it).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from quant_core.deployable import make_deployable
from quant_core.input_groups import InputRecorder, recording_input_groups
from quant_core.layerwise import _GPTQ_METHODS, as_in_one_pass, replay
from quant_core.model_quant import _reset_calibration_state, prepare_quantization
from quant_core.model_tools import eval_mode
from quant_core.preflight import AlgorithmRun

__all__ = ["LayerInputs", "StreamedCalibration"]

LayerInputs = list[tuple[tuple, dict[str, Any]]]
"""One decoder layer's calibration inputs: ``(args, kwargs)`` per batch."""


def _quantized_inputs(runs: list[AlgorithmRun]) -> bool:
    """Whether the next layer is fed the calibrated, quantized outputs of the layer before it."""
    for run in runs:
        if run.layerwise.enable:
            if run.layerwise.get_qdq_activations_from_prev_layer:
                return True
        elif run.method in _GPTQ_METHODS:
            return True
    return False


class StreamedCalibration:
    """Quantize ``model`` (its weights may be on ``meta``) with ``config``, one layer at a time.

    Use as a context manager (eval mode, no autograd, input groups recorded), and call
    :meth:`calibrate_layer` for each decoder layer in order, its weights loaded::

        with StreamedCalibration(model, config) as calib:
            for i, layer in enumerate(model.model.layers):
                load(layer)
                outputs = calib.calibrate_layer(f"model.layers.{i}.", layer, inputs)
                write(layer); free(layer)
                inputs = next_inputs(outputs)
    """

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        self.model = model
        self.runs = prepare_quantization(model, config, materialized=False)
        self.quantized_inputs = _quantized_inputs(self.runs)
        self._stack = ExitStack()
        self._recorder: InputRecorder | None = None

    def __enter__(self) -> StreamedCalibration:
        self._stack.enter_context(eval_mode(self.model))
        self._stack.enter_context(torch.no_grad())
        self._recorder = self._stack.enter_context(recording_input_groups(self.model))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def methods(self) -> list[str]:
        """The names of the algorithms run on each layer, in order."""
        return [run.method for run in self.runs]

    def calibrate_layer(self, prefix: str, layer: nn.Module, inputs: LayerInputs) -> list[Any]:
        """Calibrate ``layer`` (named ``prefix``, ending in a dot) on ``inputs`` and make it
        deployable; returns its outputs per batch, the inputs of the next layer."""
        if self._recorder is None:
            raise RuntimeError("StreamedCalibration.calibrate_layer runs inside its `with` block")
        if not inputs:
            raise ValueError(f"layer {prefix.rstrip('.')}: no calibration batches")
        outputs, seen = None, []
        # a lone max calibration computes, in its one pass, the outputs a whole-model pass hands on
        one_pass = self.methods == ["max"] and not self.quantized_inputs
        if not self.quantized_inputs and not one_pass:
            with as_in_one_pass(layer):
                outputs = [layer(*args, **kwargs) for args, kwargs in inputs]
        probe = functools.partial(layer, *inputs[0][0], **inputs[0][1])
        for run in self.runs:
            try:
                run.fn(layer, replay(inputs, seen if one_pass else None), **run.options)
            except BaseException:
                _reset_calibration_state(layer)
                raise
            self._recorder.record()
            make_deployable(self.model, prefix=prefix, probe=probe)
        if one_pass:  # its first pass over the batches (a fallback search may run more)
            outputs = seen[: len(inputs)]
        self._recorder.release()
        if outputs is None:
            outputs = [layer(*args, **kwargs) for args, kwargs in inputs]
        return outputs

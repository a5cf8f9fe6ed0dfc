"""Quantized RNN, LSTM and GRU (ModelOpt's ``QuantRNNFullBase``), registered by default as in ModelOpt.

Quantizer names follow ModelOpt's, so its configs select them: each weight parameter ``weight_*``
gets ``<name>_weight_quantizer`` (e.g. ``weight_ih_l0_weight_quantizer``, one per matrix holding
all gates; per tensor by default), and each layer and direction one input quantizer
``layer_<i>[_reverse]_input_quantizer``, applied at every time step to the step's input and to the
hidden state (``h``, and ``c`` for LSTM) before the cell. An LSTM with ``proj_size`` also has
``proj_<i>[_reverse]_input_quantizer`` before its projection. The recurrence runs in Python one
step at a time (padded or packed sequences, bidirectional, stacked, ``batch_first``, unbatched),
with torch's own cell functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from quant_core.nn.quant_module import INPUT_DEFAULT, QuantModule, fold_into
from quant_core.nn.registry import QuantModuleRegistry
from quant_core.nn.tensor_quantizer import TensorQuantizer

Hidden = tuple[torch.Tensor, ...]


def _lstm_proj_cell(x: torch.Tensor, h: Hidden, w: list, proj_q: TensorQuantizer) -> Hidden:
    """LSTM step with a projection (``torch.lstm_cell`` needs h and c of one size)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w if len(w) == 5 else (*w[:2], None, None, w[2])
    gates = F.linear(x, w_ih, b_ih) + F.linear(h[0], w_hh, b_hh)
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * h[1] + torch.sigmoid(i) * torch.tanh(g)
    out = torch.sigmoid(o) * torch.tanh(c)
    return F.linear(proj_q(out), w_hr), c


def _cell(mode: str) -> Callable[..., Hidden]:
    """The step function of ``mode``: ``(x, hidden tuple, weights, proj quantizer) -> hidden tuple``."""
    fn = {
        "RNN_TANH": torch.rnn_tanh_cell,
        "RNN_RELU": torch.rnn_relu_cell,
        "GRU": torch.gru_cell,
        "LSTM": torch.lstm_cell,
    }[mode]

    def step(x: torch.Tensor, h: Hidden, w: list, proj_q: TensorQuantizer | None) -> Hidden:
        if proj_q is not None:
            return _lstm_proj_cell(x, h, w, proj_q)
        if mode == "LSTM":
            return tuple(fn(x, h, *w[:2], *(w[2:] or (None, None))))
        return (fn(x, h[0], *w[:2], *(w[2:] or (None, None))),)

    return step


def _run_direction(
    step: Callable[..., Hidden],
    data: torch.Tensor,
    sizes: list[int],
    h: Hidden,
    weights: list[torch.Tensor],
    iq: Callable[[torch.Tensor], torch.Tensor],
    pq: Callable[[torch.Tensor], torch.Tensor] | None,
    reverse: bool,
) -> tuple[torch.Tensor, Hidden]:
    """One layer and direction of a recurrence over time-major packed ``data``.

    ``sizes`` is the batch of each step (non-increasing); ``iq`` quantizes each step's input and
    hidden state, ``pq`` (LSTM with projection) the projection input. Returns the outputs, packed
    like ``data``, and the final hidden state.
    """
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    outputs: list[torch.Tensor | None] = [None] * len(sizes)
    for t in order:
        n = sizes[t]
        x = iq(data[starts[t] : starts[t] + n])
        new = step(x, tuple(iq(s[:n]) for s in h), weights, pq)
        h = tuple(torch.cat((a, s[n:])) for a, s in zip(new, h))  # ended sequences keep theirs
        outputs[t] = new[0]
    return torch.cat(outputs), h


class VFRNNForward:
    """ModelOpt's stand-in for torch's fused ``_VF`` recurrences, with per-layer input quantizers.

    An instance is called like ``torch._VF.rnn_tanh`` / ``rnn_relu`` / ``gru`` / ``lstm``, in
    either form: ``(input, hidden, flat_weights, has_biases, num_layers, dropout, training,
    bidirectional, batch_first)`` for padded input or ``(data, batch_sizes, hidden, flat_weights,
    has_biases, num_layers, dropout, training, bidirectional)`` for packed data. ``hidden`` is
    ``(h0, c0)`` for LSTM and ``h0`` otherwise; it returns ``(output, h_n)`` or ``(output, h_n,
    c_n)``. ``input_quantizers[layer * num_directions + direction]`` quantizes the input and the
    hidden state of each step of that layer and direction (``proj_input_quantizers`` the LSTM
    projection input); the step runs in Python with torch's own cell functions.
    """

    def __init__(
        self,
        mode: str,
        bidirectional: bool,
        num_layers: int,
        has_proj: bool,
        has_bias: bool,
        input_quantizers: list[Callable[[torch.Tensor], torch.Tensor]],
        proj_input_quantizers: list[Callable[[torch.Tensor], torch.Tensor]] | None = None,
        batch_first: bool | None = False,
    ) -> None:
        if mode not in ("RNN_TANH", "RNN_RELU", "GRU", "LSTM"):
            raise ValueError(
                f"VFRNNForward: mode must be RNN_TANH, RNN_RELU, GRU or LSTM, got {mode!r}"
            )
        self.num_directions = 2 if bidirectional else 1
        if len(input_quantizers) != num_layers * self.num_directions:
            raise ValueError(
                f"VFRNNForward: need one input quantizer per layer and direction "
                f"({num_layers * self.num_directions}), got {len(input_quantizers)}"
            )
        if has_proj and mode != "LSTM":
            raise ValueError(f"VFRNNForward: only LSTM has a projection, got mode {mode!r}")
        self.mode, self.num_layers, self.has_proj = mode, num_layers, has_proj
        self.is_lstm = mode == "LSTM"
        self.num_weights_per_layer = (4 if has_bias else 2) + (1 if has_proj else 0)
        self.input_quantizers = list(input_quantizers)
        self.proj_input_quantizers = proj_input_quantizers
        self.batch_first = bool(batch_first)
        self._step = _cell(mode)

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        """Run the recurrence; the argument forms are those of torch's ``_VF`` functions."""
        if len(args) != 9:
            raise TypeError(f"VFRNNForward takes the 9 arguments of a _VF call, got {len(args)}")
        if isinstance(args[3], bool):  # padded: has_biases sits fourth
            input, hidden, flat_weights, _, _, dropout, training, _, batch_first = args
            x = input.transpose(0, 1) if batch_first else input
            sizes = [x.shape[1]] * x.shape[0]
            data = x.reshape(-1, x.shape[-1])
        else:
            data, batch_sizes, hidden, flat_weights, _, _, dropout, training, _ = args
            sizes, batch_first, x = batch_sizes.tolist(), False, None
        hidden = tuple(hidden) if self.is_lstm else (hidden,)
        finals: list[Hidden] = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                weights = list(
                    flat_weights[k * self.num_weights_per_layer :][: self.num_weights_per_layer]
                )
                pq = self.proj_input_quantizers[k] if self.proj_input_quantizers else None
                if self.has_proj and pq is None:
                    pq = _identity
                out, h = _run_direction(
                    self._step,
                    data,
                    sizes,
                    tuple(s[k] for s in hidden),
                    weights,
                    self.input_quantizers[k],
                    pq,
                    d == 1,
                )
                outs.append(out)
                finals.append(h)
            data = torch.cat(outs, -1)
            if dropout and layer < self.num_layers - 1:
                data = F.dropout(data, dropout, training)
        h_n = tuple(torch.stack(parts) for parts in zip(*finals))
        if x is not None:
            data = data.reshape(x.shape[0], x.shape[1], -1)
            data = data.transpose(0, 1) if batch_first else data
        return (data, *h_n)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class QuantRNNBase(QuantModule):
    """nn.RNN / nn.LSTM / nn.GRU with weight and per-layer input quantizers (ModelOpt's names)."""

    def _setup(self) -> None:
        self._weight_names = [
            n for n, _ in self.named_parameters(recurse=False) if n.startswith("weight")
        ]
        for name in self._weight_names:
            setattr(self, f"{name}_weight_quantizer", TensorQuantizer(INPUT_DEFAULT))
        for layer in range(self.num_layers):
            for suffix in self._suffixes:
                setattr(
                    self, f"layer_{layer}{suffix}_input_quantizer", TensorQuantizer(INPUT_DEFAULT)
                )
                if self.proj_size > 0:
                    setattr(
                        self,
                        f"proj_{layer}{suffix}_input_quantizer",
                        TensorQuantizer(INPUT_DEFAULT),
                    )

    def _quantizers(self, kind: str) -> list[TensorQuantizer]:
        """The quantizers whose attribute name ends with ``kind`` (``weight``/``input``)."""
        return [
            m
            for n, m in self.named_children()
            if n.endswith(f"_{kind}_quantizer") and isinstance(m, TensorQuantizer)
        ]

    def _disable_input_quantizers(self) -> None:
        """Turn off every layer (and projection) input quantizer (ModelOpt's helper)."""
        for q in self._quantizers("input"):
            q.disable()

    def _enable_input_quantizers(self) -> None:
        """Turn on every layer (and projection) input quantizer."""
        for q in self._quantizers("input"):
            q.enable()

    def _disable_weight_quantizers(self) -> None:
        """Turn off every weight quantizer (ModelOpt's helper)."""
        for q in self._quantizers("weight"):
            q.disable()

    def _enable_weight_quantizers(self) -> None:
        """Turn on every weight quantizer."""
        for q in self._quantizers("weight"):
            q.enable()

    @property
    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def _weights(self, layer: int, suffix: str) -> list[torch.Tensor]:
        """The (quantized) weights and biases of one layer and direction, in torch's cell order."""
        names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
        if self.bias:
            names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
        if self.proj_size > 0:
            names.append(f"weight_hr_l{layer}{suffix}")
        out = []
        for name in names:
            value = getattr(self, name)
            quantizer = getattr(self, f"{name}_weight_quantizer", None)
            out.append(quantizer(value) if quantizer is not None else value)
        return out

    def fold_weight(self) -> None:
        """Write each fake-quantized weight into its parameter and turn its quantizer off."""
        for name in self._weight_names:
            fold_into(getattr(self, name), getattr(self, f"{name}_weight_quantizer"))

    def _run_direction(
        self, data: torch.Tensor, sizes: list[int], h: Hidden, layer: int, suffix: str
    ) -> tuple[torch.Tensor, Hidden]:
        """One layer and direction over time-major packed ``data`` (``sizes``: batch per step,
        non-increasing); returns the outputs (packed like ``data``) and the final hidden state."""
        iq = getattr(self, f"layer_{layer}{suffix}_input_quantizer")
        pq = getattr(self, f"proj_{layer}{suffix}_input_quantizer", None)
        weights = self._weights(layer, suffix)
        return _run_direction(_cell(self.mode), data, sizes, h, weights, iq, pq, bool(suffix))

    def _initial_hidden(self, batch: int, ref: torch.Tensor) -> Hidden:
        count = self.num_layers * len(self._suffixes)
        h_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h = ref.new_zeros(count, batch, h_size)
        return (h, ref.new_zeros(count, batch, self.hidden_size)) if self.mode == "LSTM" else (h,)

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:
        packed = isinstance(input, PackedSequence)
        if packed:
            data, sizes = input.data, input.batch_sizes.tolist()
            batch, unbatched = sizes[0], False
        else:
            unbatched = input.dim() == 2
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{type(self).__name__}: input must be 2-D or 3-D, got {input.dim()}-D"
                )
            x = (
                input.unsqueeze(1)
                if unbatched
                else (input.transpose(0, 1) if self.batch_first else input)
            )
            batch, sizes = x.shape[1], [x.shape[1]] * x.shape[0]
            data = x.reshape(-1, x.shape[-1])
        if hx is None:
            hidden = self._initial_hidden(batch, data)
        else:
            hidden = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
            hidden = tuple(h.unsqueeze(1) for h in hidden) if unbatched else hidden
            if packed and input.sorted_indices is not None:
                hidden = tuple(h.index_select(1, input.sorted_indices) for h in hidden)
        finals: list[Hidden] = []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes):
                k = layer * len(self._suffixes) + d
                out, h = self._run_direction(
                    data, sizes, tuple(s[k] for s in hidden), layer, suffix
                )
                outs.append(out)
                finals.append(h)
            data = torch.cat(outs, -1)
            if self.dropout and layer < self.num_layers - 1:
                data = F.dropout(data, self.dropout, self.training)
        h_n = tuple(torch.stack(parts) for parts in zip(*finals))
        if packed:
            if input.unsorted_indices is not None:
                h_n = tuple(h.index_select(1, input.unsorted_indices) for h in h_n)
            output: Any = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
        else:
            output = data.reshape(len(sizes), batch, -1)
            if unbatched:
                output, h_n = output.squeeze(1), tuple(h.squeeze(1) for h in h_n)
            elif self.batch_first:
                output = output.transpose(0, 1)
        return output, (h_n if self.mode == "LSTM" else h_n[0])


@QuantModuleRegistry.register({nn.RNN: "nn.RNN"})
class QuantRNN(QuantRNNBase, nn.RNN):
    """nn.RNN (tanh or ReLU) with weight and per-layer input quantizers."""


@QuantModuleRegistry.register({nn.LSTM: "nn.LSTM"})
class QuantLSTM(QuantRNNBase, nn.LSTM):
    """nn.LSTM (optionally with ``proj_size``) with weight and per-layer input quantizers."""


@QuantModuleRegistry.register({nn.GRU: "nn.GRU"})
class QuantGRU(QuantRNNBase, nn.GRU):
    """nn.GRU with weight and per-layer input quantizers."""


__all__ = ["QuantGRU", "QuantLSTM", "QuantRNN", "QuantRNNBase", "VFRNNForward"]

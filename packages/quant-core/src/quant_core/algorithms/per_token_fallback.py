"""Per-token fallback: static per-tensor input quantizers that the calibration data defeats become
per-token dynamic.

One per-tensor amax serves every token. When a few tokens carry outliers (GELU outputs, the
residual stream of a post-LN encoder), that amax is far above what a typical token needs, and most
tokens are quantized with a handful of levels. While ``max`` calibration runs, a forward pre-hook
on every Linear whose input quantizer is static per-tensor keeps a uniform random sample of the
input rows (tokens) it sees. Once the amax is known, the error that input quantization causes in
the layer's output ``x W^T`` is measured on that sample twice: with the calibrated amax, and with
one amax per token (same element format, INT or FP). When per-token scaling lowers that error by
at least ``min_gain_db`` decibels, the quantizer is switched to per-token dynamic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from quant_core.input_groups import InputRecorder
from quant_core.nn.tensor_quantizer import TensorQuantizer

__all__ = [
    "PER_TOKEN_DYNAMIC",
    "InputError",
    "check_min_gain_db",
    "input_error",
    "per_token_fallback",
    "sample_inputs",
    "static_per_tensor_inputs",
]

PER_TOKEN_DYNAMIC = {"type": "dynamic", "block_sizes": {-1: None}, "calibrator": "max"}
"""The attributes a switched quantizer gets: one amax per token (last axis), computed at run time."""

_log = logging.getLogger(__name__)


@dataclass
class InputError:
    """Output-error energies of one layer's input quantization, summed over the sampled tokens."""

    signal: float = 0.0
    static: float = 0.0
    per_token: float = 0.0
    tokens: int = 0

    def add(self, other: InputError) -> None:
        """Accumulate ``other``'s energies and token count into this one."""
        self.signal += other.signal
        self.static += other.static
        self.per_token += other.per_token
        self.tokens += other.tokens

    @staticmethod
    def _db(signal: float, noise: float) -> float:
        return math.inf if noise <= 0 else 10 * math.log10(max(signal, 1e-300) / noise)

    @property
    def gain_db(self) -> float:
        """How much per-token scaling lowers the output error, in dB (``inf`` when it removes it)."""
        return 0.0 if self.static <= 0 else self._db(self.static, self.per_token)


def static_per_tensor_inputs(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers whose input quantizer is an enabled static per-tensor TensorQuantizer (with a
    calibrated, not constant, amax)."""
    found = {}
    for name, module in model.named_modules():
        q = getattr(module, "input_quantizer", None)
        if (
            isinstance(module, nn.Linear)
            and type(q) is TensorQuantizer
            and q.is_enabled
            and not q.is_dynamic
            and q.axis is None
            and not q.block_sizes
            and not q.learn_amax
            and not q.has_constant_amax
            and q.attribute_config.bias is None
        ):
            found[name] = module
    return found


@dataclass
class InputSample:
    """Sampled input rows per layer, and which layers read the very same input tensor."""

    rows: dict[str, Tensor] = field(default_factory=dict)
    group: dict[str, str] = field(default_factory=dict)
    """Layer -> the first layer that read the same tensor (q/k/v, gate/up); absent if alone.
    Filled when the sampling block ends (:meth:`quant_core.input_groups.InputRecorder.sources`)."""


@contextmanager
def sample_inputs(
    layers: dict[str, nn.Module], max_rows: int = 512, seed: int = 0
) -> Iterator[InputSample]:
    """Within the block, keep a uniform random sample of up to ``max_rows`` input rows per layer.

    Rows are the input flattened to ``(-1, in_features)``; each row gets a random key and the
    ``max_rows`` smallest keys seen so far are kept, so every row of every batch is equally
    likely to be in the sample. The yielded sample fills in as the layers run; layers called
    one after the other on the same tensor are recorded as one group.
    """
    if max_rows < 1:
        raise ValueError(f"fallback_rows must be >= 1, got {max_rows}")
    sample = InputSample()
    samples, keys = sample.rows, {}
    shared = InputRecorder()  # which layers read the very tensor the previous one read
    generator = torch.Generator().manual_seed(seed)

    def make_hook(name: str) -> Callable:
        def smallest(k: Tensor) -> tuple[Tensor, Tensor]:
            if k.numel() <= max_rows:
                return k, torch.arange(k.numel())
            return k.topk(max_rows, largest=False)

        def hook(_module: nn.Module, args: tuple) -> None:
            shared.note(name, args[0])
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            # only this batch's smallest keys can enter the sample: copy just those rows
            new_keys, keep = smallest(torch.rand(rows.shape[0], generator=generator))
            rows = rows[keep.to(rows.device)]
            if name in samples:
                new_keys, keep = smallest(torch.cat([keys[name], new_keys]))
                rows = torch.cat([samples[name], rows.to(samples[name])])[keep.to(rows.device)]
            samples[name], keys[name] = rows, new_keys

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield sample
    finally:
        for handle in handles:
            handle.remove()
        shared.release()
        sample.group.update(shared.sources())


def _per_token_twin(quantizer: TensorQuantizer) -> TensorQuantizer:
    """A quantizer with ``quantizer``'s element format but per-token dynamic scaling."""
    return TensorQuantizer({**quantizer.attribute_config.model_dump(), **PER_TOKEN_DYNAMIC})


def input_error(module: nn.Linear, rows: Tensor) -> InputError:
    """Output-error energies ``||x W^T||^2``, ``||(Q_static(x) - x) W^T||^2`` and
    ``||(Q_token(x) - x) W^T||^2`` of ``module``'s input quantizer on input ``rows`` (float32)."""
    quantizer = module.input_quantizer
    x = rows.float()
    if quantizer.pre_quant_scale is not None:
        x = x * quantizer.pre_quant_scale.float().to(x.device)
    stacked = torch.stack(
        [x, quantizer.fake_quantize(x) - x, _per_token_twin(quantizer).fake_quantize(x) - x]
    )
    energies = F.linear(stacked, module.weight.detach().float()).square().sum((1, 2))
    signal, static, token = energies.tolist()
    return InputError(signal, static, token, x.shape[0])


def _sum_over_ranks(errors: dict[str, InputError]) -> None:
    if not (dist.is_available() and dist.is_initialized() and errors):
        return
    sums = torch.tensor(
        [[e.signal, e.static, e.per_token, e.tokens] for e in errors.values()],
        dtype=torch.float64,
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    for err, row in zip(errors.values(), sums.tolist()):
        err.signal, err.static, err.per_token, err.tokens = row[0], row[1], row[2], int(row[3])


def check_min_gain_db(min_gain_db: object) -> None:
    """Raise a ValueError naming the option unless ``min_gain_db`` is a number >= 0."""
    if (
        isinstance(min_gain_db, bool)
        or not isinstance(min_gain_db, (int, float))
        or not min_gain_db >= 0
    ):
        raise ValueError(
            f"per_token_fallback_db must be a number >= 0, or None to turn the fallback off; got {min_gain_db!r}"
        )


def per_token_fallback(
    layers: dict[str, nn.Linear], sample: InputSample, min_gain_db: float, sync: bool = True
) -> dict[str, InputError]:
    """Switch each calibrated layer's input quantizer to per-token dynamic when, on its sampled
    rows, per-token scaling lowers the layer's output error by at least ``min_gain_db`` dB.

    Layers that read the same tensor (``sample.group``) are decided together on their summed
    errors, so a fused q/k/v or gate/up GEMM keeps one kind of input quantization.

    Returns the measurement of every switched layer; a switched quantizer keeps its element
    format, drops its amax and keeps the measurement as ``quantizer.fallback`` (which
    ``print_quant_summary`` shows; it is not saved, the new attributes are). Under
    ``torch.distributed`` the error sums are added over ranks (``sync``, the algorithm's
    ``distributed_sync``), so every rank decides alike; ``sync=False`` decides on this rank alone.
    """
    check_min_gain_db(min_gain_db)
    measured = {
        name: module
        for name, module in layers.items()
        if module.input_quantizer.amax is not None and module.input_quantizer.amax.numel() == 1
    }
    errors = {
        name: input_error(m, sample.rows[name]) if name in sample.rows else InputError()
        for name, m in measured.items()
    }
    if sync:
        _sum_over_ranks(errors)
    group_errors: dict[str, InputError] = {}
    for name, err in errors.items():
        group_errors.setdefault(sample.group.get(name, name), InputError()).add(err)
    switched = {}
    for name, err in errors.items():
        decided_by = group_errors[sample.group.get(name, name)]
        if decided_by.tokens and decided_by.gain_db >= min_gain_db:
            quantizer = measured[name].input_quantizer
            quantizer.set_from_attribute_config(PER_TOKEN_DYNAMIC)
            quantizer.fallback = err
            switched[name] = err
    if switched:
        _log.info(
            "per-token fallback: %d of %d static per-tensor input quantizers switched to per-token "
            "dynamic (layer output error lowered by >= %.1f dB): %s",
            len(switched),
            len(errors),
            min_gain_db,
            ", ".join(f"{n} ({e.gain_db:.1f} dB)" for n, e in switched.items()),
        )
    return switched

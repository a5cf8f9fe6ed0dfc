"""Data-parallel calibration: statistics reduced over the default ``torch.distributed`` group.

Each rank runs ``forward_loop`` on its own shard of the calibration data; every calibrator then
reduces what it gathered with these helpers, so that all ranks hold the statistics of the union
of the shards (max for amaxes, sums for histograms, Gram matrices and counts) and compute the
same result. Without an initialized process group of more than one rank they do nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "all_reduce", "is_distributed", "reduce_calibrators"]

_OPS = {"sum": "SUM", "max": "MAX"}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)
_MAX_DIMS = 6
_CHUNK = 1 << 26
"""Most elements reduced in one collective call (bounds the temporary buffer)."""


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` default process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layouts(tensors: Sequence[Tensor | None]) -> Tensor:
    """Agree on each slot's dtype and shape over ranks (one collective).

    Row i holds, for slot i, [present, dtype, dims...] followed by the negation of the same
    numbers (absent slots: a large value there), so one MAX reduction gives each slot's largest
    and smallest layout over the ranks that have it: they differ exactly when ranks disagree.
    """
    width = 2 + _MAX_DIMS
    meta = torch.zeros(len(tensors), 2 * width, dtype=torch.int64)
    meta[:, width:] = -(1 << 40)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(
                f"cannot reduce a {t.dtype} tensor of shape {tuple(t.shape)} across ranks "
                f"(at most {_MAX_DIMS} dims of {[str(d) for d in _DTYPES]})"
            )
        row = torch.zeros(width, dtype=torch.int64)
        row[0], row[1] = 1, _DTYPES.index(t.dtype)
        row[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64) + 1
        meta[i, :width], meta[i, width:] = row, -row
    meta = meta.to(_device())
    dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    meta = meta.cpu()
    high, low = meta[:, :width], -meta[:, width:]
    present = high[:, 0] == 1
    bad = present & (high != low).any(1)
    if bad.any():
        slots = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"ranks disagree on the dtype or shape of {len(slots)} calibration statistic(s) "
            f"(slots {slots[:8]}); data-parallel calibration needs the same model and "
            "quantizer configuration on every rank"
        )
    return high


def all_reduce(tensors: Sequence[Tensor | None], op: str = "sum") -> list[Tensor | None]:
    """Reduce ``tensors`` over the default process group, in place; returns them.

    ``op`` is ``"sum"`` or ``"max"``. A None entry (this rank saw nothing for that statistic)
    counts as zeros, the identity of both for the non-negative statistics calibration keeps,
    and comes back as a tensor when any rank had one (None when no rank had). All ranks must pass
    the same number of entries, in the same order. Without :func:`is_distributed` this is a no-op.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    out = list(tensors)
    if not is_distributed() or not out:
        return out
    layouts = _layouts(out)
    device = _device()
    home = next((t.device for t in out if t is not None), torch.device("cpu"))
    for i, t in enumerate(out):
        if t is None and layouts[i, 0] == 1:
            shape = [int(d) - 1 for d in layouts[i, 2:] if d > 0]
            out[i] = torch.zeros(shape, dtype=_DTYPES[int(layouts[i, 1])], device=home)
    for dtype in _DTYPES:
        group = [t for t in out if t is not None and t.dtype == dtype]
        for chunk in _chunks(group):
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in chunk])
            dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[op]))
            start = 0
            for t in chunk:
                n = t.numel()
                t.data.copy_(flat[start : start + n].view_as(t))
                start += n
    return out


def _chunks(group: list[Tensor]) -> list[list[Tensor]]:
    chunks: list[list[Tensor]] = []
    size = _CHUNK
    for t in group:
        if size + t.numel() > _CHUNK and (not chunks or chunks[-1]):
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.numel()
    return chunks


def all_gather_rows(rows: Tensor | None, width: int, dtype: torch.dtype) -> Tensor | None:
    """The rows (n_r, ``width``) of every rank, concatenated in rank order (None: this rank has none).

    Ranks may hold different numbers of rows; every rank gets the same result. Without
    :func:`is_distributed` it returns ``rows`` unchanged.
    """
    if not is_distributed():
        return rows
    device = _device()
    home = rows.device if rows is not None else torch.device("cpu")
    local = rows if rows is not None else torch.zeros(0, width, dtype=dtype)
    counts = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    counts[dist.get_rank()] = local.shape[0]
    dist.all_reduce(counts)
    most = int(counts.max())
    if most == 0:
        return None
    padded = torch.zeros(most, width, dtype=dtype, device=device)
    padded[: local.shape[0]] = local.to(device, dtype)
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    parts = [g[: int(n)] for g, n in zip(gathered, counts.tolist())]
    return torch.cat(parts).to(home)


def reduce_calibrators(calibrators: Sequence[Any]) -> None:
    """Reduce the statistics of the given quantizer calibrators over ranks (see the module doc).

    Max calibrators: the running amax, max over ranks. Histogram calibrators: the histogram
    range (max over ranks) first, each rank's counts re-binned onto it, then the counts summed.
    NVFP4 headroom calibrators (fixed log2 bins): the top block amax (max), the counts (sum).
    Other classes are named in a warning. Every rank must pass the same calibrators in the same
    order.
    """
    if not is_distributed():
        return
    from quant_core.calib import HistogramCalibrator, MaxCalibrator
    from quant_core.calib.nvfp4_act_headroom import NVFP4ActHeadroomCalibrator

    known = (MaxCalibrator, HistogramCalibrator, NVFP4ActHeadroomCalibrator)
    unknown = sorted({type(c).__name__ for c in calibrators if not isinstance(c, known)})
    if unknown:
        warnings.warn(
            f"calibrator class(es) {unknown} have no reduction across ranks: each rank keeps the "
            "amax of its own shard, and the ranks may disagree",
            RuntimeWarning,
            stacklevel=3,
        )
    headroom = [c for c in calibrators if isinstance(c, NVFP4ActHeadroomCalibrator)]
    for c, top in zip(headroom, all_reduce([c._max for c in headroom], "max")):
        c._max = top
    for c, hist in zip(headroom, all_reduce([c._hist for c in headroom], "sum")):
        c._hist = hist
    maxes = [c for c in calibrators if isinstance(c, MaxCalibrator)]
    for c, amax in zip(maxes, all_reduce([c._amax for c in maxes], "max")):
        c._amax = amax
    hists = [c for c in calibrators if isinstance(c, HistogramCalibrator)]
    ranges = all_reduce(
        [None if c._hist is None else torch.tensor(c._max, dtype=torch.float64) for c in hists],
        "max",
    )
    for c, top in zip(hists, ranges):
        if top is not None:
            c.rebin(float(top))
    counts = all_reduce([c._hist for c in hists], "sum")
    for c, hist in zip(hists, counts):
        c._hist = hist

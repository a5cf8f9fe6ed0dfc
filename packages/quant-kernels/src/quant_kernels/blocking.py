"""Block layouts: how a tensor splits into the groups that share one amax/scale.

Every granularity is one rule per dimension: a group size ``b_i`` (1 = each index its own group,
``d_i`` = the whole dimension is one group, anything else = blocks). Adjacent dimensions with the
same role are merged, so a block-wise weight becomes a plain ``(groups, block)`` view. A block
size that does not divide its dimension pads the dimension with zeros up to a multiple (the last
block is short; padding never changes an amax and is sliced off the output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from quant_kernels.formats import check_block_sizes

__all__ = [
    "BlockLayout",
    "block_axes",
    "group_amax",
    "reduce_amax",
]


def block_axes(
    blocks: tuple[tuple[int, int | None], ...], ndim: int
) -> dict[int, int | None] | None:
    """A format's ``((axis, size or None), ...)`` blocks as ``{non-negative axis: size or None}``
    for a ``ndim``-d tensor (ValueError for an axis out of range or named twice); None for none."""
    if not blocks:
        return None
    axes: dict[int, int | None] = {}
    for key, size in blocks:
        if not -ndim <= key < ndim:
            raise ValueError(f"block_sizes axis {key!r} is out of range for a {ndim}-d tensor")
        if key % ndim in axes:
            raise ValueError(f"block_sizes names axis {key} twice")
        axes[key % ndim] = size
    return axes


@dataclass(frozen=True)
class BlockLayout:
    """Where the groups of a tensor of ``shape`` are, and the merged view that exposes them.

    ``group`` holds the group size per dimension. ``view_shape`` is the padded tensor reshaped so
    that each group spans the dims in ``reduce_dims``; ``scale_view_shape`` is the keepdim shape of
    one value per group in that view, and ``scale_shape`` the same values per original dimension
    (``ceil(d_i / group_i)``), which is what `reduce_amax` returns.
    """

    shape: tuple[int, ...]
    group: tuple[int, ...]

    @classmethod
    def from_block_sizes(
        cls, shape: tuple[int, ...], block_sizes: dict[int, int | None]
    ) -> BlockLayout:
        """Blocks along the named axes; every other axis keeps one group per index."""
        group = [1] * len(shape)
        for axis, size in block_sizes.items():
            group[axis] = shape[axis] if size is None else size
        return cls(tuple(shape), tuple(group))

    @classmethod
    def from_axis(cls, shape: tuple[int, ...], axis: int | tuple[int, ...] | None) -> BlockLayout:
        """One group per index of the kept ``axis`` (ModelOpt's TensorQuantizer.axis); None = per tensor."""
        kept = () if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
        ndim = len(shape)
        for a in kept:
            if not isinstance(a, int) or not -ndim <= a < ndim:
                raise ValueError(
                    f"axis {axis!r} is out of range for a tensor of shape {tuple(shape)}"
                )
        kept_set = {a % ndim for a in kept}
        return cls(tuple(shape), tuple(1 if i in kept_set else d for i, d in enumerate(shape)))

    @classmethod
    def from_amax_shape(cls, shape: tuple[int, ...], amax: torch.Tensor) -> BlockLayout:
        """The layout whose groups an amax broadcastable to ``shape`` describes (per-tensor/per-channel)."""
        ashape = tuple(amax.shape)
        if amax.numel() == 1:
            return cls(tuple(shape), tuple(shape))
        if len(ashape) > len(shape):
            raise ValueError(
                f"amax of shape {ashape} does not broadcast to the input shape {tuple(shape)}"
            )
        ashape = (1,) * (len(shape) - len(ashape)) + ashape
        group = []
        for a, d in zip(ashape, shape):
            if a not in (1, d):
                raise ValueError(
                    f"amax of shape {tuple(amax.shape)} does not broadcast to the input shape {tuple(shape)}"
                )
            group.append(1 if a == d else d)
        return cls(tuple(shape), tuple(group))

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """Groups per dimension."""
        return tuple(math.ceil(d / g) if g else 1 for d, g in zip(self.shape, self.group))

    @cached_property
    def scale_shape(self) -> tuple[int, ...]:
        """One value per group, laid out per original dimension."""
        return self.counts

    @cached_property
    def pads(self) -> tuple[int, ...]:
        """Zeros appended to each dimension so every group is whole."""
        return tuple(c * g - d for c, g, d in zip(self.counts, self.group, self.shape))

    @cached_property
    def padded(self) -> bool:
        """True when some block size does not divide its dimension."""
        return any(self.pads)

    @cached_property
    def _merged(self) -> list[tuple[int, bool]]:
        """(size, is-reduced) pieces of the view, adjacent pieces of the same role merged."""
        pieces: list[tuple[int, bool]] = []
        for count, g in zip(self.counts, self.group):
            for size, reduced in ((count, False), (g, True)):
                if size == 1:
                    continue
                if pieces and pieces[-1][1] == reduced:
                    pieces[-1] = (pieces[-1][0] * size, reduced)
                else:
                    pieces.append((size, reduced))
        return pieces or [(1, True)]

    @cached_property
    def view_shape(self) -> tuple[int, ...]:
        """Shape of the padded tensor with each group spanning the ``reduce_dims``."""
        return tuple(size for size, _ in self._merged)

    @cached_property
    def reduce_dims(self) -> tuple[int, ...]:
        """Dims of ``view_shape`` that lie inside one group."""
        return tuple(i for i, (_, reduced) in enumerate(self._merged) if reduced)

    @cached_property
    def scale_view_shape(self) -> tuple[int, ...]:
        """Keepdim shape of the per-group values in the view (broadcasts against ``view_shape``)."""
        return tuple(1 if reduced else size for size, reduced in self._merged)

    @cached_property
    def num_groups(self) -> int:
        """How many groups (= scales) the tensor has."""
        return math.prod(self.counts)

    def to_view(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (if needed) and reshape ``x`` to ``view_shape`` (a view when ``x`` is contiguous and unpadded)."""
        if self.padded:
            pad: list[int] = []
            for p in reversed(self.pads):
                pad += [0, p]
            x = F.pad(x, pad)
        return x.reshape(self.view_shape)

    def from_view(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_view`: reshape to the padded shape and slice the padding off."""
        padded_shape = tuple(c * g for c, g in zip(self.counts, self.group))
        y = y.reshape(padded_shape)
        if self.padded:
            y = y[tuple(slice(0, d) for d in self.shape)]
        return y

    def amax_to_view(self, amax: torch.Tensor) -> torch.Tensor:
        """Shape a given static amax to ``scale_view_shape``; accepts a scalar, one value per group
        (any shape with that many elements, e.g. `reduce_amax`'s or ModelOpt's ``(groups, 1)``), or
        a same-rank tensor broadcastable to `scale_shape`."""
        target = self.scale_view_shape
        if amax.numel() == 1:
            return amax.reshape(()).expand(target)
        if amax.numel() == self.num_groups:
            return amax.reshape(target)
        if amax.dim() == len(self.shape):
            try:
                return amax.expand(self.scale_shape).reshape(target)
            except RuntimeError:
                pass
        raise ValueError(
            f"amax of shape {tuple(amax.shape)} does not fit the input shape {self.shape} with "
            f"groups {self.group}: expected a scalar or {self.num_groups} values shaped {self.scale_shape}"
        )


def layout_for(
    shape: tuple[int, ...],
    block_sizes: dict[int, int | None] | None,
    axis: int | tuple[int, ...] | None = None,
    amax: torch.Tensor | None = None,
) -> BlockLayout:
    """The layout named by block_sizes, else by axis, else by a static amax's shape (else per tensor)."""
    if block_sizes is not None:
        if axis is not None:
            raise ValueError(f"give either axis={axis!r} or block_sizes={block_sizes!r}, not both")
        return BlockLayout.from_block_sizes(shape, block_sizes)
    if axis is not None or amax is None:
        return BlockLayout.from_axis(shape, axis)
    return BlockLayout.from_amax_shape(shape, amax)


def reduce_amax(
    x: torch.Tensor,
    axis: int | tuple[int, ...] | None = None,
    block_sizes: dict | None = None,
) -> torch.Tensor:
    """Max of |x| per tensor (0-d), per kept ``axis`` (keepdim, broadcastable to x) or per block.

    ``axis`` is the axis (or axes) that keeps one amax per index, as ModelOpt's TensorQuantizer.axis.
    With ``block_sizes`` the result has shape ``ceil(d_i / b_i)`` per dimension (e.g. ``(out,
    in/128)`` for ``{-1: 128}``); `fake_quantize` accepts it back as a static amax. The result is
    float32; NaN in a group gives NaN for that group.
    """
    checked = check_block_sizes(block_sizes) if block_sizes else {}
    axes = block_axes(tuple((k, v) for k, v in checked.items() if isinstance(k, int)), x.dim())
    layout = layout_for(tuple(x.shape), axes, axis)
    if axis is None and axes is None:
        _check_not_empty(x, list(range(x.dim())))
        return group_amax(x.reshape(-1), (0,)).reshape(())
    return group_amax(layout.to_view(x), layout.reduce_dims).reshape(layout.scale_shape)


def _check_not_empty(x: torch.Tensor, reduce_dims: list[int]) -> None:
    """An amax over an empty group has no value: say so instead of torch's IndexError."""
    if x.numel() == 0 and any(x.shape[d] == 0 for d in reduce_dims):
        raise ValueError(
            f"cannot take the amax of an empty tensor (shape {tuple(x.shape)}): a tensor "
            "with no elements has no maximum; skip empty tensors or give amax explicitly"
        )


def group_amax(xv: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """max |x| over ``reduce_dims`` (keepdim), float32; NaN in a group gives NaN.

    No |x| temporary: on CPU max and min separately (measured several times faster than
    ``abs().amax()`` or ``aminmax`` there), on GPU one fused ``aminmax`` pass. The innermost dim is
    reduced first so the rest is small.
    """
    dims = sorted(reduce_dims, reverse=True)
    _check_not_empty(xv, dims)
    if not dims:  # every axis kept: each element is its own group
        return xv.float().abs()
    if not xv.is_cuda and xv.is_floating_point() and xv.element_size() == 1:
        xv = xv.float()  # CPU max/min have no float8 kernels
    if xv.is_cuda:
        lo, hi = torch.aminmax(xv, dim=dims[0], keepdim=True)
    else:
        hi = xv.amax(dim=dims[0], keepdim=True)
        lo = xv.amin(dim=dims[0], keepdim=True)
    amax = torch.maximum(hi.float(), lo.float().neg_()).abs_()  # abs_: an all-zero group gives +0
    for d in dims[1:]:
        amax = amax.amax(dim=d, keepdim=True)
    return amax

"""Quantized megatron-core tensor-parallel linears, with amax kept identical on every tensor-parallel rank.

``ColumnParallelLinear`` and ``RowParallelLinear`` route their matmul through ``_forward_impl(input,
weight, ...)``; the quantized classes quantize ``input`` and ``weight`` there, so megatron's own
communication (copy/scatter of inputs, all-reduce or reduce-scatter of outputs) is unchanged.

Each rank holds a shard: column-parallel weights are split along the output dim, row-parallel
weights (and their inputs) along the input dim. An amax that describes more than the local shard —
a per-tensor amax, or a row-parallel per-output-channel weight amax — is all-reduced (max) over the
tensor-parallel group whenever a quantizer loads its calibrated amax, so all ranks agree; amax that
is local to a shard (column-parallel per-channel, block-wise along the sharded dim) stays local.
KV-cache quantizers on megatron's core attention live in :mod:`quant_llm.megatron_attention`.
Needs ``megatron-core`` (``pip install quant-llm[nemo]``); tested with megatron-core 0.16.1 on CPU/gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"quant_llm.megatron needs megatron-core: pip install 'quant-llm[nemo]' ({err})"
    ) from err
from quant_core.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from quant_core.nn.quant_module import INPUT_DEFAULT, WEIGHT_DEFAULT, FoldableWeight


def _tensor_parallel_group() -> Any:
    """The tensor-parallel process group, or None outside a (multi-rank) megatron run."""
    if not (
        dist.is_available()
        and dist.is_initialized()
        and parallel_state.model_parallel_is_initialized()
    ):
        return None
    if parallel_state.get_tensor_model_parallel_world_size() < 2:
        return None
    return parallel_state.get_tensor_model_parallel_group()


class TensorParallelQuantizer(TensorQuantizer):
    """A TensorQuantizer whose loaded amax is max-reduced over the tensor-parallel group when it spans shards.

    ``sync_channels``: also reduce a per-channel (axis 0, not block-wise) amax, as for row-parallel
    weights whose output channels are split across ranks.
    """

    def __init__(self, *args: Any, sync_channels: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_channels = sync_channels

    def spans_shards(self) -> bool:
        """True when this quantizer's amax describes data spread over several tensor-parallel ranks."""
        amax = self.amax
        if amax is None:
            return False
        if amax.numel() == 1:
            return True
        return self.sync_channels and not self.block_sizes and self.axis in (0, -2)

    def load_calib_amax(self) -> None:
        """Load the calibrated amax, then agree on it across the tensor-parallel group."""
        super().load_calib_amax()
        self.sync_tensor_parallel_amax()

    def sync_tensor_parallel_amax(self) -> None:
        """All-reduce (max) this amax over the tensor-parallel group when it spans shards."""
        group = _tensor_parallel_group()
        if group is None or not self.spans_shards():
            return
        with torch.no_grad():
            dist.all_reduce(self.amax.data, op=dist.ReduceOp.MAX, group=group)


class _QuantParallelLinear(FoldableWeight, QuantModule):
    """Quantizes the local input and weight shard in megatron's ``_forward_impl``."""

    _row_parallel = False

    def _setup(self) -> None:
        row = self._row_parallel
        self.input_quantizer = TensorParallelQuantizer(INPUT_DEFAULT)
        self.weight_quantizer = TensorParallelQuantizer(WEIGHT_DEFAULT, sync_channels=row)
        self.output_quantizer = TensorParallelQuantizer(INPUT_DEFAULT)
        self.output_quantizer.disable()

    def _forward_impl(
        self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        out = super()._forward_impl(
            self.input_quantizer(input), self.weight_quantizer(weight), *args, **kwargs
        )
        return self.output_quantizer(out)


@QuantModuleRegistry.register({ColumnParallelLinear: "ColumnParallelLinear"})
class QuantColumnParallelLinear(_QuantParallelLinear, ColumnParallelLinear):
    """megatron-core ColumnParallelLinear with input, weight and output quantizers."""


@QuantModuleRegistry.register({RowParallelLinear: "RowParallelLinear"})
class QuantRowParallelLinear(_QuantParallelLinear, RowParallelLinear):
    """megatron-core RowParallelLinear with input, weight and output quantizers (per-channel weight amax synced)."""

    _row_parallel = True


def sync_tensor_parallel_amax(model: torch.nn.Module) -> int:
    """Agree on every shard-spanning amax across the tensor-parallel group (e.g. after setting amax by hand).

    Returns the number of quantizers reduced on this rank.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, TensorParallelQuantizer) and module.spans_shards():
            module.sync_tensor_parallel_amax()
            count += 1
    return count

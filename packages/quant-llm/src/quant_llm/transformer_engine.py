"""Quantized NVIDIA Transformer Engine linears (and megatron-core's TE wrappers); UNTESTED in this project.

Transformer Engine needs CUDA and could not be installed where quant was developed, so this
module has never run: the ``gpu``-marked test in ``tests/llm/test_llm_transformer_engine.py``
exercises it on a machine with TE (``pip install 'transformer-engine[pytorch]'``). quant-llm's
plugin imports it only once the user's code has imported ``transformer_engine``.

How it hooks in (TE 2.x API): ``te.pytorch.Linear`` and ``te.pytorch.LayerNormLinear`` read their
weights through ``_get_weight_tensors()``; the quantized classes return the fake-quantized weights
there, so TE's own GEMM, tensor-parallel communication and bias handling are untouched. ``Linear``
also quantizes its input on entry to ``forward(inp, ...)``. The output quantizer is applied to the
output tensor (the first element when TE or megatron returns ``(out, bias)``). megatron-core's
``TELinear``, ``TEColumnParallelLinear``, ``TERowParallelLinear`` and
``TELayerNormColumnParallelLinear`` get the same treatment; their amax is synchronised over the
tensor-parallel group as for megatron's own linears, and ``TEDotProductAttention`` gets KV-cache
quantizers. Limits: ``LayerNormLinear`` normalises its input inside TE's fused kernel, so its
input (activation) quantizer cannot be applied and raises if enabled; split weights
(``parameters_split``) are not supported; QAT with fused weight-gradient accumulation is not.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import transformer_engine.pytorch as te
except ImportError as err:
    raise ImportError(
        "quant_llm.transformer_engine needs NVIDIA Transformer Engine, which is not importable here: "
        f"pip install 'transformer-engine[pytorch]' ({err})"
    ) from err

from quant_core.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from quant_core.nn.quant_module import INPUT_DEFAULT, WEIGHT_DEFAULT, FoldableWeight

try:  # megatron-core's TE wrappers and tensor-parallel amax sync, when megatron-core is usable
    from megatron.core.extensions import transformer_engine as mte

    from quant_llm.megatron import TensorParallelQuantizer
    from quant_llm.megatron_attention import QuantCoreAttentionMixin
except ImportError:  # no megatron model can exist then; TE's own linears still get quantized
    mte = None


def _quantizer(attributes: Any, row_parallel: bool = False) -> TensorQuantizer:
    """A tensor-parallel-aware quantizer when megatron-core is usable, else a plain one."""
    if mte is not None:
        return TensorParallelQuantizer(attributes, sync_channels=row_parallel)
    return TensorQuantizer(attributes)


def _quantize_output(quantizer: TensorQuantizer, out: Any) -> Any:
    if isinstance(out, tuple):
        return (quantizer(out[0]), *out[1:])
    return quantizer(out)


class _QuantTEWeightMixin(FoldableWeight, QuantModule):
    """Weight and output quantizers for a TE module that reads its weight through ``_get_weight_tensors``."""

    def _setup(self) -> None:
        names = list(getattr(self, "weight_names", ["weight"]))
        if len(names) != 1:
            raise NotImplementedError(
                f"{type(self).__name__} with split weights {names} (parameters_split) is not supported"
            )
        if not hasattr(super(), "_get_weight_tensors"):
            raise NotImplementedError(
                f"{type(self).__name__}: this Transformer Engine has no _get_weight_tensors(); "
                "quant-llm needs transformer-engine >= 2.0"
            )
        row = getattr(self, "parallel_mode", None) == "row"
        self.input_quantizer = _quantizer(INPUT_DEFAULT)
        self.weight_quantizer = _quantizer(WEIGHT_DEFAULT, row_parallel=row)
        self.output_quantizer = _quantizer(INPUT_DEFAULT)
        self.output_quantizer.disable()

    def _get_weight_tensors(self) -> list[torch.Tensor]:
        return [self.weight_quantizer(w) for w in super()._get_weight_tensors()]


class _QuantTELinearMixin(_QuantTEWeightMixin):
    """TE Linear: input quantized on entry, weight through ``_get_weight_tensors``."""

    def forward(self, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(self.input_quantizer(inp), *args, **kwargs)
        return _quantize_output(self.output_quantizer, out)


class _QuantTELayerNormLinearMixin(_QuantTEWeightMixin):
    """TE LayerNormLinear: weight (and output) quantized; the normalised input is inside TE's kernel."""

    def forward(self, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.input_quantizer.is_enabled:
            raise NotImplementedError(
                f"{self.input_quantizer._name or type(self).__name__}: Transformer Engine's "
                "LayerNormLinear normalises its input inside a fused kernel, so quant-llm cannot "
                "quantize that activation. Disable it with the config entry "
                f'{{"quantizer_name": "*input_quantizer", "parent_class": "{self._quant_original_key}", '
                '"enable": False} (or build the megatron model with its local layer spec)'
            )
        return _quantize_output(self.output_quantizer, super().forward(inp, *args, **kwargs))


@QuantModuleRegistry.register({te.Linear: "te_Linear"})
class QuantTELinear(_QuantTELinearMixin, te.Linear):
    """transformer_engine.pytorch.Linear with input, weight and output quantizers."""


@QuantModuleRegistry.register({te.LayerNormLinear: "te_LayerNormLinear"})
class QuantTELayerNormLinear(_QuantTELayerNormLinearMixin, te.LayerNormLinear):
    """transformer_engine.pytorch.LayerNormLinear with weight and output quantizers."""


# megatron puts placeholders in place of its TE wrappers when it cannot use this TE (HAVE_TE False);
# such wrappers cannot be built, so there is nothing to map.
if mte is not None and mte.HAVE_TE:

    @QuantModuleRegistry.register({mte.TELinear: "TELinear"})
    class QuantTELinearWrapper(_QuantTELinearMixin, mte.TELinear):
        """megatron-core TELinear (returns ``(out, bias)``) with input, weight and output quantizers."""

    @QuantModuleRegistry.register({mte.TEColumnParallelLinear: "TEColumnParallelLinear"})
    class QuantTEColumnParallelLinear(_QuantTELinearMixin, mte.TEColumnParallelLinear):
        """megatron-core TEColumnParallelLinear with input, weight and output quantizers."""

    @QuantModuleRegistry.register({mte.TERowParallelLinear: "TERowParallelLinear"})
    class QuantTERowParallelLinear(_QuantTELinearMixin, mte.TERowParallelLinear):
        """megatron-core TERowParallelLinear (per-channel weight amax synced over TP)."""

    @QuantModuleRegistry.register(
        {mte.TELayerNormColumnParallelLinear: "TELayerNormColumnParallelLinear"}
    )
    class QuantTELayerNormColumnParallelLinear(
        _QuantTELayerNormLinearMixin, mte.TELayerNormColumnParallelLinear
    ):
        """megatron-core TELayerNormColumnParallelLinear with weight and output quantizers."""

    @QuantModuleRegistry.register({mte.TEDotProductAttention: "TEDotProductAttention"})
    class QuantTEDotProductAttention(QuantCoreAttentionMixin, mte.TEDotProductAttention):
        """megatron-core TEDotProductAttention with q/k/v_bmm_quantizer (KV-cache quantization)."""

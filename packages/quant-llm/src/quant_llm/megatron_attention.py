"""KV-cache quantizers on megatron-core's core attention (``DotProductAttention``).

megatron's ``Attention.forward`` projects, applies RoPE, updates its inference KV cache and then
calls ``core_attention(query, key, value, attention_mask, ...)`` with tensors shaped
``[seq, batch, heads (or query groups), head_dim]``. The quantized class applies
``q_bmm_quantizer``, ``k_bmm_quantizer`` and ``v_bmm_quantizer`` to those three tensors on entry,
so FP8_KV_CFG, FP8_AFFINE_KV_CFG, NVFP4_KV_CFG and INT8_KV_CFG (pattern ``*[kv]_bmm_quantizer``)
quantize keys and values exactly as they enter attention, as the Hugging Face mapping does. The
quantizers see each 4-D tensor in Hugging Face's ``[batch, heads, seq, head_dim]`` order (a
permuted view), so a config's axes, blocks and affine-bias dims mean the same on both; 3-D packed
(``thd``) tensors are quantized as they come. All three quantizers start disabled.

With tensor parallelism each rank holds a slice of the heads; a per-tensor KV amax describes all
of them, so it is max-reduced over the tensor-parallel group when calibration loads it (the
quantizers are :class:`~quant_llm.megatron.TensorParallelQuantizer`).
"""

from __future__ import annotations

from typing import Any

import torch

from quant_core.nn import QuantModule, QuantModuleRegistry
from quant_llm.megatron import TensorParallelQuantizer

try:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"quant_llm.megatron_attention needs megatron-core: pip install 'quant-llm[nemo]' ({err})"
    ) from err

KV_QUANTIZER_NAMES = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")


def quantize_sbhd(quantizer: TensorParallelQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Apply ``quantizer`` to a ``[seq, batch, heads, dim]`` tensor as if it were ``[batch, heads, seq, dim]``."""
    if x.dim() != 4 or not quantizer.is_enabled:
        return quantizer(x)
    return quantizer(x.permute(1, 2, 0, 3)).permute(2, 0, 1, 3).contiguous()


class QuantCoreAttentionMixin(QuantModule):
    """Quantizes query, key and value as they enter a megatron core-attention module's ``forward``."""

    def _setup(self) -> None:
        for name in KV_QUANTIZER_NAMES:
            quantizer = TensorParallelQuantizer()
            quantizer.disable()
            setattr(self, name, quantizer)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        return super().forward(
            quantize_sbhd(self.q_bmm_quantizer, query),
            quantize_sbhd(self.k_bmm_quantizer, key),
            quantize_sbhd(self.v_bmm_quantizer, value),
            *args,
            **kwargs,
        )


@QuantModuleRegistry.register({DotProductAttention: "DotProductAttention"})
class QuantDotProductAttention(QuantCoreAttentionMixin, DotProductAttention):
    """megatron-core DotProductAttention (the local, TE-free core attention) with q/k/v_bmm_quantizer."""

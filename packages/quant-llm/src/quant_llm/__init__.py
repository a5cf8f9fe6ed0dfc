"""quant-llm: Hugging Face and Megatron mappings, KV-cache quantizers, MoE experts and LLM calibration data.

Installing quant-llm registers its mappings with quant-core through the ``quant_core.plugins``
entry point; ``mtq.quantize`` picks them up with no extra call, including model families,
megatron-core and Transformer Engine imported after the first quantize.
"""

from quant_llm._version import __version__
from quant_llm.calib_data import bundled_calibration_text, create_forward_loop, get_calib_dataloader
from quant_llm.evaluation import perplexity
from quant_llm.hf_moe import all_experts_forward_loop, calibrate_all_experts, experts_without_tokens
from quant_llm.kv_configs import INT8_KV_CFG, with_kv_cache
from quant_llm.plugin import register_model
from quant_llm.streamed import StreamedModel, StreamedResult

__all__ = [
    "INT8_KV_CFG",
    "StreamedModel",
    "StreamedResult",
    "__version__",
    "all_experts_forward_loop",
    "bundled_calibration_text",
    "calibrate_all_experts",
    "create_forward_loop",
    "experts_without_tokens",
    "get_calib_dataloader",
    "perplexity",
    "register_model",
    "with_kv_cache",
]

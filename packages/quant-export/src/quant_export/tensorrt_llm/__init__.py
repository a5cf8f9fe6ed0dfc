"""TensorRT-LLM checkpoints (``config.json`` + ``rank{r}.safetensors``) for ``trtllm-build``.

One module per job: :mod:`.families` (HF -> TensorRT-LLM names per model family),
:mod:`.config` (``PretrainedConfig``),
:mod:`.formats` (per-format tensors of a linear layer), :mod:`.experts` (MoE layers),
:mod:`.split` (tensor-parallel splitting), :mod:`.checkpoint` (the writer) and
:mod:`.validate` (the validator).
"""

from quant_export.tensorrt_llm.checkpoint import export_tensorrt_llm_checkpoint
from quant_export.tensorrt_llm.validate import validate_tensorrt_llm_checkpoint

__all__ = ["export_tensorrt_llm_checkpoint", "validate_tensorrt_llm_checkpoint"]

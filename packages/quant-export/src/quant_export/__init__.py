"""quant-export: ONNX Q/DQ export, onnxruntime verification and TensorRT engines for quant-core models.

``export_onnx`` writes a graph with weights stored quantized and activations as Q/DQ,
``verify_onnx`` compares it in onnxruntime with the PyTorch fake-quant model, and
``build_engine`` turns it into a TensorRT engine (``pip install quant-export[tensorrt]``), and
``export_hf_checkpoint`` writes a quantized transformers model as a unified Hugging Face
checkpoint in ModelOpt's layout (safetensors with real codes and scales, KV-cache scales) for
vLLM, SGLang and TensorRT-LLM, ``export_compressed_tensors`` in the compressed-tensors layout
that vLLM, SGLang and transformers load, and ``export_tensorrt_llm_checkpoint`` writes
TensorRT-LLM's own checkpoint (``config.json`` + ``rank{r}.safetensors``) for ``trtllm-build``.
"""

from quant_export._version import __version__
from quant_export.compressed_tensors_export import export_compressed_tensors
from quant_export.hf_checkpoint import export_hf_checkpoint
from quant_export.onnx_export import export_onnx
from quant_export.quantizers import UnsupportedFormatError
from quant_export.tensorrt_engine import build_engine
from quant_export.tensorrt_llm import (
    export_tensorrt_llm_checkpoint,
    validate_tensorrt_llm_checkpoint,
)
from quant_export.verify import VerifyReport, ort_integer_matmul_saturates, verify_onnx

__all__ = [
    "UnsupportedFormatError",
    "VerifyReport",
    "__version__",
    "build_engine",
    "export_compressed_tensors",
    "export_hf_checkpoint",
    "export_onnx",
    "export_tensorrt_llm_checkpoint",
    "ort_integer_matmul_saturates",
    "validate_tensorrt_llm_checkpoint",
    "verify_onnx",
]

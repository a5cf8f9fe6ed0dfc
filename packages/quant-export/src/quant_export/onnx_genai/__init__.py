"""onnxruntime-genai export: a quant-core INT4/INT8 weight-only Llama as a folder that
``onnxruntime_genai.Model`` + ``Generator`` run (MatMulNBits from our own codes and scales).

``export_onnx_genai(model, tokenizer_or_model_dir, out_dir)`` is the entry point; see
:mod:`.export` for options, :mod:`.weights` for what each Linear becomes and what is refused,
:mod:`.graph` for the decoder graph and :mod:`.genai_config` for the runtime's config.
"""

from quant_export.onnx_genai.export import (
    DEFAULT_ACCURACY_LEVEL,
    EMBEDDING_CHOICES,
    KIND,
    LM_HEAD_CHOICES,
    MODEL_TYPES,
    check_layout,
    check_onnx_genai,
    export_layout,
    export_onnx_genai,
    is_onnx_genai,
    write_onnx_genai,
)

__all__ = [
    "DEFAULT_ACCURACY_LEVEL",
    "EMBEDDING_CHOICES",
    "KIND",
    "LM_HEAD_CHOICES",
    "MODEL_TYPES",
    "check_layout",
    "check_onnx_genai",
    "export_layout",
    "export_onnx_genai",
    "is_onnx_genai",
    "write_onnx_genai",
]

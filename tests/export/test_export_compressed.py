"""Export refuses models compressed by mtq.compress, naming the layer and what to do instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quant_core as mtq
from quant_export import UnsupportedFormatError, export_hf_checkpoint, export_onnx
from quant_export.tensorrt_llm import export_tensorrt_llm_checkpoint


def _compressed() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(2, 64)
    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=lambda m: m(x))
    return mtq.compress(model), x


@pytest.mark.parametrize("exporter", ["onnx", "hf", "trtllm"])
def test_export_refuses_compressed_model(exporter: str, tmp_path) -> None:
    model, x = _compressed()
    calls = {
        "onnx": lambda: export_onnx(model, x, tmp_path / "m.onnx"),
        "hf": lambda: export_hf_checkpoint(model, tmp_path / "hf"),
        "trtllm": lambda: export_tensorrt_llm_checkpoint(model, tmp_path / "trt"),
    }
    with pytest.raises(UnsupportedFormatError, match=r"layer 0 .*export before mtq.compress"):
        calls[exporter]()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("exporter", ["onnx", "hf", "trtllm"])
@pytest.mark.parametrize(
    ("attrs", "reason"), [({"rotate": True}, "Hadamard"), ({"backend": "int8-user"}, "backend")]
)
def test_export_refuses_rotated_and_custom_backend_quantizers(
    exporter: str, attrs: dict, reason: str, tmp_path
) -> None:
    """A rotation or custom backend has no export form: a checkpoint without it would be wrong."""
    from quant_llm.testing.tiny_models import tiny_model

    mtq.nn.register_quant_backend("int8-user", lambda x, q: x)
    try:
        model = tiny_model("llama", hidden_size=64, intermediate_size=128)
        cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0, **attrs}}}
        mtq.quantize(model, {**cfg, "algorithm": "max"})
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        calls = {
            "onnx": lambda: export_onnx(model, ids, tmp_path / "m.onnx"),
            "hf": lambda: export_hf_checkpoint(model, tmp_path / "hf"),
            "trtllm": lambda: export_tensorrt_llm_checkpoint(
                model, "llama", export_dir=tmp_path / "trt"
            ),
        }
        with pytest.raises(UnsupportedFormatError, match=rf"weight_quantizer .*{reason}"):
            calls[exporter]()
    finally:
        mtq.nn.unregister_quant_backend("int8-user")
    assert not any(tmp_path.iterdir())


_NVFP4_STATIC = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)},
}
_LSQ_CFG = {
    "quant_cfg": {"*weight_quantizer": _NVFP4_STATIC},
    "algorithm": {"method": "lsq", "scale_algorithm": {"method": "max"}},
}


@pytest.mark.parametrize("exporter", ["onnx", "hf", "compressed-tensors", "trtllm"])
@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("NVFP4_FOUR_OVER_SIX_CFG", "weight_quantizer .*four over six"),
        ("lsq", "weight_quantizer .*lsq"),
        ("NVFP4_KV_ROTATE_CFG", "k_bmm_quantizer .*Hadamard"),
    ],
)
def test_export_refuses_nvfp4_four_over_six_lsq_and_rotated_keys(
    exporter: str, config: str, reason: str, tmp_path
) -> None:
    """Four over six's per-block M=4 choice and 6 * 256 global scale, LSQ's separate
    quantization / dequantization amaxes and rotated keys are not written: refused."""
    from quant_export import export_compressed_tensors
    from quant_llm.testing.tiny_models import tiny_model

    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    cfg = _LSQ_CFG if config == "lsq" else getattr(mtq, config)
    if config.endswith("KV_ROTATE_CFG"):  # ModelOpt 0.47's KV configs: KV entries only
        cfg = {"quant_cfg": [*mtq.config._base_disable_all, *cfg["quant_cfg"]], "algorithm": "max"}
    mtq.quantize(model, cfg, lambda m: m(ids))
    calls = {
        "onnx": lambda: export_onnx(model, ids, tmp_path / "m.onnx"),
        "hf": lambda: export_hf_checkpoint(model, tmp_path / "hf"),
        "compressed-tensors": lambda: export_compressed_tensors(model, tmp_path / "ct"),
        "trtllm": lambda: export_tensorrt_llm_checkpoint(
            model, "llama", export_dir=tmp_path / "trt"
        ),
    }
    with pytest.raises(UnsupportedFormatError, match=reason):
        calls[exporter]()
    assert not any(tmp_path.iterdir())

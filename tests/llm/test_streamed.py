"""Quantizing from the safetensors files one decoder layer at a time (quant_llm.streamed).

The reference is the whole-model job: the same model loaded whole in float32, ``mtq.quantize`` with
the same config on the same batches, exported by the whole-model exporter. The streamed job must
write the very same bytes for every tensor and the same config.json, and report the perplexities
``windows_perplexity`` computes on the whole model before and after quantization.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib

import pytest
import torch
from safetensors import safe_open

import quant_core as mtq
from quant_export.compressed_tensors_export import export_compressed_tensors
from quant_export.hf_checkpoint import export_hf_checkpoint
from quant_export.streamed_checkpoint import StreamedCheckpoint
from quant_llm.evaluation import windows_perplexity
from quant_llm.streamed import StreamedModel
from quant_llm.testing.tiny_models import tiny_model

transformers = pytest.importorskip("transformers")

EXPORTERS = {"compressed-tensors": export_compressed_tensors, "modelopt": export_hf_checkpoint}


def _config(name: str, algorithm=None) -> dict:
    config = copy.deepcopy(getattr(mtq, name))
    if algorithm is not None:
        config["algorithm"] = algorithm
    return config


def _fp8_with_kv() -> dict:
    import quant_llm

    return quant_llm.with_kv_cache(_config("FP8_DEFAULT_CFG", "max"), mtq.FP8_KV_CFG)


CASES = {
    # name: (config, layout, tied embeddings, checkpoint dtype)
    "fp8-max-kv": (lambda: _fp8_with_kv(), "compressed-tensors", True, torch.bfloat16),
    "nvfp4-max": (lambda: _config("NVFP4_DEFAULT_CFG"), "modelopt", False, torch.bfloat16),
    "int8-smoothquant": (lambda: _config("INT8_SMOOTHQUANT_CFG"), "compressed-tensors", True, torch.float32),
    "int4-awq-gptq": (lambda: _config("INT4_AWQ_CFG"), "compressed-tensors", False, torch.float16),
    "fp8-gptq-layerwise": (lambda: _config("FP8_DEFAULT_CFG", {"method": "gptq", "layerwise": True}), "modelopt", True, torch.bfloat16),
    "nvfp4-awq-lite": (lambda: _config("NVFP4_AWQ_LITE_CFG"), "modelopt", True, torch.bfloat16),
}  # fmt: skip


def _save(folder: pathlib.Path, tied: bool, dtype: torch.dtype) -> pathlib.Path:
    model = tiny_model(
        "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model.to(dtype).save_pretrained(folder)
    return folder


def _batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(4)]


EVAL = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _stream(source, config, layout, out) -> tuple[StreamedModel, dict]:
    streamed = StreamedModel(source, device="cpu")
    out.mkdir()
    writer = StreamedCheckpoint(out, layout, torch.bfloat16, streamed.parts)
    written = []

    def write(model, scope, prefix):
        # one decoder layer is in memory at a time: the one being written
        loaded = [n for n, p in model.named_parameters() if not p.is_meta and ".layers." in n]
        allowed = {prefix.split(".")[-2]} if prefix else set()
        assert {n.split(".layers.")[1].split(".")[0] for n in loaded} <= allowed
        written.append(writer.write(model, scope, prefix))

    result = streamed.quantize(config, _batches(), write, eval_windows=EVAL, progress=False)
    writer.finish(streamed.model)
    assert len(written) == streamed.parts == len(set(written))
    return streamed, result


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_files_equal_the_whole_model_export(tmp_path, case):
    make_config, layout, tied, dtype = CASES[case]
    source = _save(tmp_path / "src", tied, dtype)
    whole = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    float_ppl = windows_perplexity(whole, EVAL)

    def loop(model):
        for batch in _batches():
            model(**batch)

    mtq.quantize(whole, make_config(), loop)
    quant_ppl = windows_perplexity(whole, EVAL)
    EXPORTERS[layout](whole, tmp_path / "whole", dtype=torch.bfloat16)

    streamed, result = _stream(source, make_config(), layout, tmp_path / "streamed")

    expected, got = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    differing = [
        k for k in expected
        if got[k].dtype != expected[k].dtype or got[k].shape != expected[k].shape
        or _bytes(got[k]) != _bytes(expected[k])
    ]  # fmt: skip
    assert differing == []
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "whole" / "config.json").read_text())
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert math.isclose(result.ppl["float"], float_ppl, rel_tol=1e-6)
    assert math.isclose(result.ppl["quantized"], quant_ppl, rel_tol=1e-6)
    assert result.ppl["quantized"] != result.ppl["float"]
    # nothing stays loaded: every weight of the model is back on meta
    assert all(p.is_meta for p in streamed.model.parameters())


def test_transformers_loads_the_streamed_checkpoint(tmp_path):
    source = _save(tmp_path / "src", True, torch.bfloat16)
    _, result = _stream(source, _fp8_with_kv(), "compressed-tensors", tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16
    )
    # bfloat16 files against the float32 fake-quant pass: close, not equal
    assert windows_perplexity(reloaded, EVAL) == pytest.approx(result.ppl["quantized"], rel=0.05)


def test_a_config_quantizing_the_lm_head_is_refused(tmp_path):
    source = _save(tmp_path / "src", False, torch.bfloat16)
    config = _config("FP8_DEFAULT_CFG", "max")
    config["quant_cfg"]["*lm_head*"] = {"enable": True}
    with pytest.raises(ValueError, match=r"quantizes lm_head\..* outside the decoder layers"):
        StreamedModel(source, device="cpu").quantize(config, _batches(), lambda *a: None)


def test_a_checkpoint_missing_a_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _save(tmp_path / "src", True, torch.bfloat16)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    streamed = StreamedModel(source, device="cpu")
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        streamed.quantize(_config("FP8_DEFAULT_CFG", "max"), _batches(), lambda *a: None)


def test_a_missing_cuda_device_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from quant_llm.streamed import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_on_cuda_matches_the_cpu(tmp_path):
    source = _save(tmp_path / "src", True, torch.bfloat16)
    cpu = StreamedModel(source, device="cpu").quantize(
        _fp8_with_kv(), _batches(), lambda *a: None, eval_windows=EVAL, progress=False
    )
    gpu = StreamedModel(source, device="cuda").quantize(
        _fp8_with_kv(), _batches(), lambda *a: None, eval_windows=EVAL, progress=False
    )
    assert gpu.ppl["float"] == pytest.approx(cpu.ppl["float"], rel=1e-3)
    assert gpu.ppl["quantized"] == pytest.approx(cpu.ppl["quantized"], rel=2e-2)

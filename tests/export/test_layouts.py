"""The layout registry is the one source: the CLI's choices, validate's dispatch and the README's
tables all come from :data:`quant_export.layouts.LAYOUTS`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quant_export.cli import build_parser
from quant_export.layouts import LAYOUTS, engine_table, layout_table, render_readme

README = Path(__file__).resolve().parents[2] / "packages" / "quant-export" / "README.md"


def test_readme_tables_are_the_registry_rendering():
    text = README.read_text(encoding="utf-8")
    assert "<!-- generated: layouts -->" in text and "<!-- generated: engines -->" in text
    assert render_readme(text) == text, "run: python -m quant_export.layouts " + str(README)


def test_render_readme_replaces_a_stale_table_and_keeps_the_rest():
    stale = "intro\n<!-- generated: layouts -->\n| old | table |\n<!-- end generated -->\noutro"
    out = render_readme(stale).split("\n")
    assert out[0] == "intro" and out[-1] == "outro" and "| old | table |" not in out
    assert out[2:-2] == layout_table()
    assert any(line.startswith("| `trtllm` | fp8, int8_sq") for line in out)


def test_engine_table_has_a_row_per_quant_algo_of_any_engine():
    from quant_export.engines import LOADERS

    rows = {line.split(" | ")[0].removeprefix("| ") for line in engine_table()[2:]}
    assert {a for loader in LOADERS.values() for a in loader.quant_algos} <= rows


def test_readme_synopsis_lists_the_registry_formats():
    assert f"[--format {'|'.join(LAYOUTS)}]" in README.read_text(encoding="utf-8")


def test_quantize_choices_and_help_come_from_the_registry():
    parser = build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    fmt = next(a for a in quantize._actions if a.dest == "format")
    assert list(fmt.choices) == list(LAYOUTS)
    described = " ".join(quantize.description.split())
    for name, row in LAYOUTS.items():
        assert f"{name} ({' '.join(row.notes.split())})" in described


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_row_names_importable_functions(name):
    from quant_export.layouts import _resolve

    row = LAYOUTS[name]
    for spec in (row.writer, row.validator, row.recogniser):
        assert callable(_resolve(spec)), spec
    if row.streamed is not None:
        assert row.part_writer().collect is not None


def _folders(tmp_path: Path) -> dict[str, Path]:
    def folder(name: str, files: dict[str, str]) -> Path:
        path = tmp_path / name
        path.mkdir()
        for fname, text in files.items():
            (path / fname).write_text(text)
        return path

    def hf(method: str) -> dict[str, str]:
        return {"config.json": json.dumps({"quantization_config": {"quant_method": method}})}

    trt = {"config.json": json.dumps({"mapping": {}, "architecture": "L"}), "rank0.safetensors": ""}
    return {
        "compressed-tensors": folder("ct", hf("compressed-tensors")),
        "modelopt": folder("mo", hf("modelopt")),
        "onnx": folder("onnx", {"model.onnx": ""}),
        "onnx-genai": folder("genai", {"model.onnx": "", "genai_config.json": "{}"}),
        "trtllm": folder("trt", trt),
    }


def test_every_layout_folder_is_recognised_by_its_row_alone(tmp_path):
    from quant_export.checkpoint_check import layout_of

    folders = _folders(tmp_path)
    assert set(folders) == set(LAYOUTS)
    for name, folder in folders.items():
        assert [n for n, row in LAYOUTS.items() if row.recognises(folder)] == [name]
        assert layout_of(folder) == name


def test_an_unknown_quant_method_is_refused_by_name(tmp_path):
    from quant_export.checkpoint_check import CheckpointError, layout_of

    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(CheckpointError, match="quant_method 'gptq' is not one this tool writes"):
        layout_of(tmp_path)

"""The layout registry: every output layout quant-export writes, one row each.

A row names the layout, the ``--qformat`` / ``--kv-cache`` values it holds, the engines that read
it, its writer, its validator and how a written folder is recognised. Everything else reads these
rows: the ``quant-export quantize`` choices and help (:mod:`quant_export.cli`), the job itself
(:mod:`quant_export.quantize_cmd`), the layer-by-layer writer
(:mod:`quant_export.streamed_checkpoint`), ``validate`` / ``inspect``
(:mod:`quant_export.checkpoint_check`), the export driver (:mod:`quant_export.export_driver`) and
the README's layout and engine tables (:func:`readme_tables`). Adding a layout is its file (a
writer with the signature of :meth:`Layout.write`, a validator, a recogniser) and one row here.

Writers, validators and recognisers are named as ``module:attribute`` and imported when used, so
reading the registry (building the command line) imports no exporter.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Layout:
    """One output layout of quant-export."""

    name: str
    """The ``--format`` value."""
    qformats: tuple[str, ...]
    """The ``--qformat`` values it holds."""
    kv_caches: tuple[str, ...]
    """The ``--kv-cache`` values it holds."""
    engines: tuple[str, ...]
    """The engines that read it (``validate``'s ``loaders``; for modelopt the checkpoint's own
    ``hf_quant_config.json`` narrows them per format, :data:`quant_export.engines.LOADERS`)."""
    writer: str
    """``module:function`` with the signature of :meth:`write`."""
    validator: str
    """``module:function``: ``validator(folder) -> dict`` (what ``validate`` returns), raising
    :class:`quant_export.checkpoint_check.CheckpointError` (or a ValueError) on the first problem."""
    recogniser: str
    """``module:function``: ``recogniser(folder) -> bool``, True for a folder of this layout (no
    folder is recognised by two rows)."""
    kind: str = ""
    """What a written folder's marker and ``validate`` call the layout (default: the name)."""
    streamed: str | None = None
    """``module:attribute`` of its :class:`quant_export.checkpoint_files.PartWriter`, for a layout
    written layer by layer (never loading the model whole); None for the whole-model layouts."""
    transformers_loads: bool = False
    """Whether stock transformers loads the files (``quantize`` then reloads them for the report)."""
    notes: str = ""
    """What reads it, in a few words (the help and the README)."""

    @property
    def marker(self) -> str:
        """The layout's name in output-folder markers and in ``validate``."""
        return self.kind or self.name

    def write(self, model: Any, out: Path, dtype: Any, sample: Any, args: Any) -> Path:
        """Write the quantized ``model`` into the folder ``out``: ``dtype`` for the tensors left
        unquantized, ``sample`` input ids (the layouts that trace a graph), ``args`` the parsed
        ``quantize`` arguments (``--tp`` / ``--pp``)."""
        return _resolve(self.writer)(model, out, dtype, sample, args)

    def validate(self, folder: Path) -> dict[str, Any]:
        """What :attr:`validator` says of ``folder``, with ``layout`` and ``loaders`` filled in."""
        info = _resolve(self.validator)(folder)
        return {"layout": self.marker, "loaders": list(self.engines), **info}

    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds a checkpoint of this layout."""
        return bool(_resolve(self.recogniser)(folder))

    def part_writer(self) -> Any:
        """The :class:`~quant_export.checkpoint_files.PartWriter` of a streamed layout."""
        if self.streamed is None:
            raise ValueError(
                f"layout {self.name!r} cannot be written layer by layer; one of "
                f"{', '.join(n for n, row in LAYOUTS.items() if row.streamed)}"
            )
        return _resolve(self.streamed)


_INT4 = ("int4_awq", "int4_gptq", "int4_rtn")
_CHECK = "quant_export.checkpoint_check"

LAYOUTS: dict[str, Layout] = {
    row.name: row
    for row in (
        Layout(
            "compressed-tensors",
            ("fp8", "fp8_pc_pt", "int8_sq", *_INT4, "nvfp4", "nvfp4_awq"),
            ("fp8", "none"),
            ("vllm", "sglang", "transformers (compressed-tensors)"),
            "quant_export.compressed_tensors_export:export_layout",
            f"{_CHECK}:validate_compressed_tensors",
            f"{_CHECK}:is_compressed_tensors",
            streamed="quant_export.compressed_tensors_export:STREAMED",
            transformers_loads=True,
            notes="vLLM, SGLang, transformers",
        ),
        Layout(
            "modelopt",
            ("fp8", "fp8_pc_pt", *_INT4, "nvfp4", "nvfp4_awq"),
            ("fp8", "nvfp4", "none"),
            ("vllm", "sglang", "tensorrt_llm"),
            "quant_export.hf_checkpoint:export_layout",
            f"{_CHECK}:validate_modelopt",
            f"{_CHECK}:is_modelopt",
            streamed="quant_export.hf_checkpoint:STREAMED",
            notes="vLLM / SGLang (FP8, NVFP4), TensorRT-LLM",
        ),
        Layout(
            "onnx",
            ("fp8", "fp8_pc_pt", "int8_sq", *_INT4, "nvfp4", "mxfp8"),
            ("none",),
            ("onnxruntime", "TensorRT"),
            "quant_export.onnx_export:export_layout",
            "quant_export.onnx_export:check_layout",
            "quant_export.onnx_export:is_onnx_folder",
            notes="onnxruntime / TensorRT",
        ),
        Layout(
            "onnx-genai",
            _INT4,
            ("none",),
            ("onnxruntime-genai",),
            "quant_export.onnx_genai:export_layout",
            "quant_export.onnx_genai:check_layout",
            "quant_export.onnx_genai:is_onnx_genai",
            notes="onnxruntime-genai (CPU): MatMulNBits decoder with KV cache, genai_config.json",
        ),
        Layout(
            "trtllm",
            ("fp8", "int8_sq", *_INT4, "w4a8_awq", "nvfp4", "nvfp4_awq"),
            ("fp8", "none"),
            ("tensorrt_llm",),
            "quant_export.tensorrt_llm.checkpoint:export_layout",
            "quant_export.tensorrt_llm.validate:check_layout",
            f"{_CHECK}:is_tensorrt_llm",
            kind="tensorrt-llm",
            notes="TensorRT-LLM (trtllm-build), --tp x --pp rank files",
        ),
    )
}
"""Every layout, by ``--format`` name (the order of the command line's choices)."""


def by_marker(marker: str) -> Layout:
    """The row whose :attr:`Layout.marker` is ``marker``."""
    return next(row for row in LAYOUTS.values() if row.marker == marker)


def help_text() -> str:
    """The ``layouts:`` paragraph of ``quant-export quantize --help``."""
    rows = [f"{name} ({row.notes})" for name, row in LAYOUTS.items()]
    whole = [name for name, row in LAYOUTS.items() if row.streamed is None]
    return (
        f"layouts: {', '.join(rows)}. {', '.join(whole[:-1])} and {whole[-1]} load the model "
        "whole; the others are written layer by layer."
    )


def layout_table() -> list[str]:
    """The README's table of layouts (markdown lines)."""
    lines = [
        "| `--format` | `--qformat` | `--kv-cache` | read by | written |",
        "|---|---|---|---|---|",
    ]
    for name, row in LAYOUTS.items():
        written = "layer by layer" if row.streamed else "from the whole model"
        lines.append(
            f"| `{name}` | {', '.join(row.qformats)} | {', '.join(row.kv_caches)} | "
            f"{row.notes} | {written} |"
        )
    return lines


def engine_table() -> list[str]:
    """The README's table of which engine loads which ModelOpt-layout ``quant_algo``
    (:data:`quant_export.engines.LOADERS`), as markdown lines."""
    from quant_export.engines import LOADERS

    algos = sorted({a for loader in LOADERS.values() for a in loader.quant_algos})
    head = " | ".join(f"{loader.name} (`{loader.source}`)" for loader in LOADERS.values())
    lines = [f"| `quant_algo` | {head} |", "|---|" + "---|" * len(LOADERS)]
    for algo in algos:
        cells = " | ".join(
            "yes" if algo in loader.quant_algos else "no" for loader in LOADERS.values()
        )
        lines.append(f"| {algo} | {cells} |")
    kv = " | ".join(", ".join(sorted(loader.kv_algos)) for loader in LOADERS.values())
    lines.append(f"| KV cache | {kv} |")
    mixed = " | ".join("yes" if loader.mixed else "no" for loader in LOADERS.values())
    lines.append(f"| MIXED_PRECISION | {mixed} |")
    return lines


README_TABLES = {"layouts": layout_table, "engines": engine_table}
"""The README's generated tables, each between ``<!-- generated: NAME -->`` and
``<!-- end generated -->`` lines."""


def render_readme(text: str) -> str:
    """``text`` (a README) with every generated table replaced by the registry's rendering."""
    out: list[str] = []
    lines = iter(text.split("\n"))
    for line in lines:
        out.append(line)
        name = line.removeprefix("<!-- generated: ").removesuffix(" -->")
        if name != line and name in README_TABLES:
            for skipped in lines:
                if skipped == "<!-- end generated -->":
                    break
            out += [*README_TABLES[name](), "<!-- end generated -->"]
    return "\n".join(out)


if __name__ == "__main__":  # python -m quant_export.layouts README.md: rewrite its tables
    import sys

    for path in map(Path, sys.argv[1:]):
        path.write_text(render_readme(path.read_text("utf-8")), encoding="utf-8")

"""The export driver: how every quant-export command writes a layout's folder.

One preamble and one ending for ``quantize``, ``hf``, ``trtllm`` and :func:`export_onnx_genai
<quant_export.onnx_genai.export_onnx_genai>`: the output folder is checked before any work
(:func:`quant_export.output_folder.check_output`: never the model folder, never a folder of
another layout or of another tool without ``--overwrite``), the layout is written into a staging
folder beside it, validated there by its registry row's validator (a folder of another layout is
an error too), and swapped in with one rename holding the marker record
(:class:`quant_export.output_folder.OutputFolder`). The writers themselves refuse a model they
cannot write (:func:`quant_export.deployable_check.check_deployable`) before writing anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quant_export.layouts import LAYOUTS, Layout
from quant_export.output_folder import OutputFolder, check_output

__all__ = ["LayoutOutput"]


class LayoutOutput:
    """The folder ``output`` being written in ``layout`` (a :data:`~quant_export.layouts.LAYOUTS`
    name); a context manager (on an error, ``output`` is left as it was).

    ``model_dir`` (the folder read, if any) may not be or hold ``output``; ``resume`` goes on from
    an interrupted layer-by-layer run.
    """

    def __init__(
        self,
        layout: str,
        output: str | os.PathLike[str],
        *,
        model_dir: Path | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.layout: Layout = LAYOUTS[layout]
        self.output = check_output(output, model_dir, overwrite, kind=self.layout.marker)
        if resume and not self.layout.streamed:
            raise SystemExit(
                f"--resume applies to the layouts written layer by layer, not {layout}"
            )
        self._folder = OutputFolder(
            self.output, resumable=self.layout.streamed is not None, resume=resume
        )
        self.info: dict[str, Any] | None = None

    def __enter__(self) -> LayoutOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self._folder.__exit__(*exc)

    @property
    def staging(self) -> Path:
        """Where the layout's files are written."""
        return self._folder.staging

    @property
    def work(self) -> Path:
        """The private folder holding :attr:`staging` (and a resumable run's progress)."""
        return self._folder.work

    def write(self, model: Any, dtype: Any, sample: Any = None, args: Any = None) -> Path:
        """Write ``model`` into :attr:`staging` with the layout's writer (:meth:`Layout.write`)."""
        return self.layout.write(model, self.staging, dtype, sample, args)

    def validate(self) -> dict[str, Any]:
        """Validate :attr:`staging` (once); returns what ``validate`` says of it."""
        from quant_export.checkpoint_check import CheckpointError, validate

        if self.info is None:
            info = validate(self.staging)
            if info["layout"] != self.layout.marker:
                raise CheckpointError(
                    f"the {self.layout.name} writer wrote a {info['layout']} folder"
                )
            self.info = info
        return self.info

    def publish(self, record: dict[str, Any]) -> Path:
        """Validate (unless done), then swap the folder in as ``output`` with ``record`` (and the
        layout's ``kind``) as its marker; returns ``output``."""
        self.validate()
        return self._folder.publish({**record, "kind": self.layout.marker})

"""A Hugging Face checkpoint written one part (decoder layer) at a time.

The streamed ``quant-export quantize`` never holds the whole model: it calibrates a decoder layer,
hands it here, and frees it. :class:`StreamedCheckpoint` writes that layer's tensors into a shard
of their own (``model-0000i-of-0000N.safetensors``, N = the number of parts, known from the
start), keeping only the few fields ``config.json`` needs; :meth:`StreamedCheckpoint.finish`
writes ``config.json`` (and the layout's other texts) and ``model.safetensors.index.json``. The
tensors and configs are those the whole-model exporters write (the layout's
:class:`~quant_export.checkpoint_files.PartWriter`, its registry row's ``streamed``, on a part of
the model), so a streamed checkpoint holds the same bytes per
tensor as a whole-model export of the same quantized model. The folder is a staging folder
(:class:`quant_export.output_folder.OutputFolder`): without ``config.json`` no loader accepts it
until :meth:`finish` has run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quant_export.checkpoint_files import SAFETENSORS_INDEX, Scope, index_text
from quant_export.deployable_check import check_deployable
from quant_export.layouts import LAYOUTS

__all__ = ["StreamedCheckpoint"]


class StreamedCheckpoint:
    """Writes a checkpoint of ``layout`` into ``folder`` in ``parts`` parts, then :meth:`finish`."""

    def __init__(self, folder: Path, layout: str, dtype: torch.dtype, parts: int) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
        self._row = LAYOUTS[layout].part_writer()  # ValueError for a whole-model layout
        if parts < 1:
            raise ValueError(f"a checkpoint has at least one part, got {parts}")
        self.folder, self.layout, self.dtype, self.parts = Path(folder), layout, dtype, parts
        self._metas: list[Any] = []
        self._weight_map: dict[str, str] = {}
        self._total = 0

    def _shard_name(self, index: int) -> str:
        if self.parts == 1:
            return "model.safetensors"
        return f"model-{index + 1:05d}-of-{self.parts:05d}.safetensors"

    def write(self, model: nn.Module, scope: Scope, prefix: str = "") -> str:
        """Write the tensors of the modules ``scope`` selects as the next shard; returns its name.

        ``prefix`` (the part's module name with a dot, or "" for a part that is not one module)
        names the layers checked to be deployable first."""
        if len(self._metas) == self.parts:
            raise RuntimeError(f"all {self.parts} parts are written already")
        if prefix:
            check_deployable(model, prefix=prefix, pre_quant_scale=self._row.pre_quant_scale)
        with torch.no_grad():
            tensors, meta = self._row.collect(model, self.dtype, scope)
        name = self._shard_name(len(self._metas))
        clash = sorted(set(tensors) & set(self._weight_map))
        if clash:
            raise ValueError(f"{clash[0]} was written in an earlier part already")
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        self._weight_map.update(dict.fromkeys(tensors, name))
        self._total += sum(t.numel() * t.element_size() for t in tensors.values())
        self._metas.append(meta)
        return name

    @property
    def written(self) -> int:
        """How many parts are written."""
        return len(self._metas)

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs to go on after the parts written so far (JSON values)."""
        return {
            "layout": self.layout,
            "parts": self.parts,
            "metas": [self._row.to_json(meta) for meta in self._metas],
            "weight_map": self._weight_map,
            "total": self._total,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from ``state`` (:meth:`state` of an interrupted run writing the same folder),
        checking that every shard it lists is there."""
        if state.get("layout") != self.layout or state.get("parts") != self.parts:
            raise ValueError(
                f"the partial checkpoint was written as {state.get('layout')} in "
                f"{state.get('parts')} parts, not {self.layout} in {self.parts}"
            )
        missing = sorted(
            {f for f in state["weight_map"].values() if not (self.folder / f).is_file()}
        )
        if missing:
            raise ValueError(f"the partial checkpoint lost {missing[0]}")
        self._metas = [self._row.from_json(meta) for meta in state["metas"]]
        self._weight_map = dict(state["weight_map"])
        self._total = int(state["total"])

    def finish(self, model: nn.Module) -> list[str]:
        """Write ``config.json`` and the layout's other texts, and the shard index; returns the
        file names of the checkpoint."""
        if len(self._metas) != self.parts:
            raise RuntimeError(f"{len(self._metas)} of {self.parts} parts written; cannot finish")
        texts = self._row.texts(model, self._metas, self.dtype)
        shards = sorted(set(self._weight_map.values()))
        if self.parts > 1:
            texts[SAFETENSORS_INDEX] = index_text(self._weight_map, self._total)
        for fname, text in texts.items():
            (self.folder / fname).write_text(text, encoding="utf-8")
        return [*texts, *shards]

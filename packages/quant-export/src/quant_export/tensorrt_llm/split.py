"""Tensor-parallel splitting of TensorRT-LLM checkpoint tensors, and the fusion of q/k/v parts.

Rules (``tensorrt_llm/layers/linear.py``: ``ColumnLinear`` holds ``out / tp`` rows, ``RowLinear``
``in / tp`` columns and the whole bias, added once after the all-reduce; ModelOpt's
``modelopt/torch/export/postprocess.py`` ``_split_model_config_for_tp`` table "ws / as / ps"):

* column-parallel: ``weight``, ``bias`` and per-output scales (``weights_scaling_factor``
  vectors and block matrices, ``per_channel_scale``) are split along the output axis;
  per-tensor scales and ``prequant_scaling_factor`` are copied to every rank.
* row-parallel: ``weight``, block scales and ``prequant_scaling_factor`` are split along the input
  axis; ``bias``, per-output and per-tensor scales are copied.
* ``attention.qkv`` is split part by part (q, k and v each by heads) and each rank holds
  ``[q_r; k_r; v_r]`` (TensorRT-LLM's ``Attention`` reads its local heads in that order).
* embeddings (``use_parallel_embedding``, ``embedding_sharding_dim`` 0,
  ``modeling_utils.parallelize_embedding``) are zero-padded to a multiple of ``tp`` rows and split
  along rows; so is ``lm_head`` (a column-parallel linear over the vocabulary).
"""

from __future__ import annotations

import torch

from quant_export.tensorrt_llm.families import COLUMN
from quant_export.tensorrt_llm.formats import TrtLinear


def _axes(leaf: str, t: torch.Tensor) -> tuple[int | None, int | None]:
    """(output axis, input axis) of a leaf tensor of a 2-D linear layer; per-tensor scales have neither."""
    if t.numel() == 1 and leaf != "weight":
        return None, None
    if t.dim() == 2:
        return 0, 1
    if leaf in ("prequant_scaling_factor", "smoother"):
        return None, 0
    return 0, None


def chunks(t: torch.Tensor, tp: int, axis: int, what: str) -> list[torch.Tensor]:
    """``t`` cut into ``tp`` equal pieces along ``axis`` (an error naming ``what`` when it does not divide)."""
    if t.shape[axis] % tp:
        raise ValueError(
            f"{what}: size {t.shape[axis]} along axis {axis} is not divisible by tensor parallel {tp}"
        )
    return list(torch.chunk(t, tp, dim=axis))


def pad_rows(t: torch.Tensor, tp: int) -> torch.Tensor:
    """Zero rows appended so that the row count is a multiple of ``tp``."""
    extra = -t.shape[0] % tp
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


def head_parts(parts: list[TrtLinear], heads: bool) -> list[TrtLinear]:
    """q, k and v as separate parts (GPT-2's ``c_attn`` holds all three in one layer)."""
    if not heads or len(parts) != 1:
        return parts
    (part,) = parts
    pieces: list[TrtLinear] = [TrtLinear(part.quant_algo, part.group_size) for _ in range(3)]
    for leaf, t in part.tensors.items():
        out_axis, _ = _axes(leaf, t)
        for piece, chunk in zip(
            pieces, chunks(t, 3, out_axis, leaf) if out_axis is not None else [t] * 3
        ):
            piece.tensors[leaf] = chunk.contiguous()
    return pieces


def split_linear(
    name: str, parts: list[TrtLinear], parallel: str, tp: int
) -> list[dict[str, torch.Tensor]]:
    """Per-rank tensors (``name.leaf``) of one TensorRT-LLM linear layer made of ``parts``."""
    ranks: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(tp)]
    for part in parts:
        for leaf, t in part.tensors.items():
            out_axis, in_axis = _axes(leaf, t)
            axis = out_axis if parallel == COLUMN else in_axis
            if parallel == COLUMN and out_axis is not None and name == "lm_head":
                t = pad_rows(t, tp)
            pieces = [t] * tp if axis is None else chunks(t, tp, axis, f"{name}.{leaf}")
            for rank, piece in zip(ranks, pieces):
                rank.setdefault(leaf, []).append(piece)
    out = []
    for rank in ranks:
        tensors = {}
        for leaf, pieces in rank.items():
            out_axis, _ = _axes(leaf, pieces[0])
            if out_axis is None or len(pieces) == 1:
                tensors[f"{name}.{leaf}"] = pieces[0].contiguous()  # shared across the parts
            else:
                tensors[f"{name}.{leaf}"] = torch.cat(pieces, dim=out_axis).contiguous()
        out.append(tensors)
    return out


def split_rows(name: str, t: torch.Tensor, tp: int) -> list[dict[str, torch.Tensor]]:
    """An embedding table padded and split along its rows (vocabulary or positions)."""
    return [{name: c.contiguous()} for c in chunks(pad_rows(t, tp), tp, 0, name)]


def split_pipeline(
    tp_ranks: list[dict[str, torch.Tensor]], pp: int, num_layers: int
) -> list[dict[str, torch.Tensor]]:
    """Rank files for ``pp`` pipeline stages: rank ``p * tp + t`` holds stage ``p``'s layers of ``tp_ranks[t]``.

    ``tensorrt_llm/mapping.py`` (``tp_rank = rank % tp_size``, ``pp_rank = rank // tp_size``,
    ``pp_layers``: contiguous blocks) and ``modeling_utils.DecoderLayerList`` (a stage numbers its
    layers from 0); the embeddings live on the first stage, ``ln_f`` and ``lm_head`` on the last.
    """
    per_stage = num_layers // pp
    out = []
    for stage in range(pp):
        first, last = stage * per_stage, (stage + 1) * per_stage
        for tensors in tp_ranks:
            rank = {}
            for name, t in tensors.items():
                if name.startswith("transformer.layers."):
                    index, rest = name[len("transformer.layers.") :].split(".", 1)
                    if first <= int(index) < last:
                        rank[f"transformer.layers.{int(index) - first}.{rest}"] = t
                elif "embedding" in name:
                    if stage == 0:
                        rank[name] = t
                elif stage == pp - 1:
                    rank[name] = t
            out.append(rank)
    return out

"""What every checkpoint writer shares: the tensors a layout stores unchanged, safetensors shards and
their index, the texts beside them, and the atomic install of a written folder.

The layouts' own files (:mod:`quant_export.hf_checkpoint`, :mod:`quant_export.compressed_tensors_export`,
:mod:`quant_export.tensorrt_llm.checkpoint`, :mod:`quant_export.streamed_checkpoint`) decide what a
quantized layer becomes; this module writes it. Files are written into a private folder beside the
target and installed with one rename (:func:`write_atomically`).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from quant_core.atomic import atomic_temp
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.output_folder import exchange_paths
from quant_export.quantizers import UnsupportedFormatError

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD_SIZE = 5 * 2**30
SAFETENSORS_INDEX = "model.safetensors.index.json"


def quantizer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizer of ``model`` by module name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, TensorQuantizer | SequentialQuantizer)
    }


Scope = Callable[[str], bool] | None
"""Which module and tensor names a part of a checkpoint holds (None: all)."""


def in_scope(scope: Scope, name: str) -> bool:
    """Whether ``name`` (a module or state-dict key) belongs to ``scope``."""
    return scope is None or scope(name)


def scoped(
    model: nn.Module, scope: Scope
) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module], list[tuple[str, nn.Module]]]:
    """The state dict, the quantizers (by name) and the named modules of ``model`` that ``scope``
    selects (all by default): what a writer collects a part of the checkpoint from."""
    state = {k: v for k, v in model.state_dict().items() if in_scope(scope, k)}
    quantizers = {k: v for k, v in quantizer_names(model).items() if in_scope(scope, k)}
    modules = [(n, m) for n, m in model.named_modules() if in_scope(scope, n)]
    return state, quantizers, modules


def check_weight_stored(name: str, module: nn.Linear, state: dict[str, torch.Tensor]) -> None:
    """Raise unless the state dict stores the layer's own (out, in) weight as ``name.weight``."""
    key = f"{name}.weight" if name else "weight"
    stored, weight = state.get(key), module.weight
    if (
        stored is None
        or stored.shape != weight.shape
        or stored.stride() != weight.stride()
        or stored.data_ptr() != weight.data_ptr()
    ):
        raise UnsupportedFormatError(
            f"layer {name}: its weight is not stored as {key} in (out, in) layout (fused experts, "
            "GPT-2 Conv1D, ...); a quantized or smoothed layer like it cannot be exported yet"
        )


def plain_tensors(
    state: dict[str, torch.Tensor],
    quantizers: dict[str, nn.Module],
    replaced: dict[str, dict[str, torch.Tensor]],
    quantized: set[str],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The state dict without quantizer buffers, ``replaced`` layers swapped in, tied copies dropped.

    Float tensors go to ``dtype``, except the non-weight tensors of ``quantized`` layers (scales),
    which are written as given.
    """
    prefixes = tuple(f"{q}." for q in quantizers)
    quantized_keys = {f"{n}.weight" for n in quantized}
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefixes):
            continue
        ident = (value.data_ptr(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            if key in quantized_keys or seen[ident] in quantized_keys:
                raise UnsupportedFormatError(
                    f"{key} is tied to {seen[ident]} and one of them is quantized; untie them or "
                    "leave both unquantized"
                )
            continue  # a tied copy (e.g. lm_head.weight): the loader re-ties it from the config
        seen[ident] = key
        layer, _, leaf = key.rpartition(".")
        if layer in replaced and leaf == "weight":
            continue
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    for layer, layer_tensors in replaced.items():
        for leaf, value in layer_tensors.items():
            floating = value.dtype in (torch.float32, torch.float64)
            keep = layer in quantized and leaf != "weight"
            tensors[f"{layer}.{leaf}"] = value if keep or not floating else value.to(dtype)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def architecture(model: nn.Module) -> str:
    """The transformers class name of the model (the first class in its MRO defined by transformers)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def _shards(
    tensors: dict[str, torch.Tensor], max_shard_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > max_shard_size:
            yield shard
            shard, size = {}, 0
        shard[key] = value
        size += nbytes
    if shard:
        yield shard


def _write_files(
    folder: Path, tensors: dict[str, torch.Tensor], texts: dict[str, str], max_shard_size: int
) -> list[str]:
    """Write the safetensors file(s) and the JSON texts into ``folder``; returns the file names."""
    for fname, text in texts.items():
        (folder / fname).write_text(text, encoding="utf-8")
    shards = list(_shards(tensors, max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
        return [*texts, "model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, tqdm(shards, desc="export hf: shards", leave=False)):
        save_file(shard, str(folder / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / SAFETENSORS_INDEX).write_text(index_text(weight_map, total), encoding="utf-8")
    return [*texts, *names, SAFETENSORS_INDEX]


def index_text(weight_map: dict[str, str], total_size: int) -> str:
    """``model.safetensors.index.json`` of shards holding ``weight_map`` (tensor -> file)."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HF_STALE = ("model*.safetensors*", "hf_quant_config.json")  # another HF export's, if not rewritten


def install(
    staging: Path, export_dir: Path, written: list[str], stale: tuple[str, ...] = _HF_STALE
) -> None:
    """Make the staged files ``export_dir`` in one step: the whole previous folder or the whole new.

    A new or empty ``export_dir`` is one rename. Into a folder holding files: the files this export
    does not write are linked into the staging folder (those matching ``stale``, an earlier export's
    shards or configs that would shadow the new ones, are left out), and the two folders are
    exchanged atomically (Linux ``renameat2``; elsewhere file by file). A folder holding weights of
    another layout (``*.safetensors`` that ``stale`` does not match) is refused, not merged.
    """
    mask = _umask()  # the staging folder and files are private until they are complete
    for fname in written:
        os.chmod(staging / fname, 0o666 & ~mask)
    os.chmod(staging, 0o777 & ~mask)
    if not export_dir.exists() or not any(export_dir.iterdir()):
        os.replace(staging, export_dir)  # rename(2) also replaces an empty directory
        return
    old = {p.name: p for p in export_dir.iterdir()}
    replaced = {n for n in old if any(fnmatch.fnmatch(n, pattern) for pattern in stale)}
    foreign = sorted(n for n in old if n.endswith(".safetensors") and n not in replaced)
    if foreign:
        raise FileExistsError(
            f"{export_dir} holds {', '.join(foreign[:3])} of another checkpoint layout; writing "
            "here would mix two checkpoints: choose another folder or empty it first"
        )
    for name, path in old.items():
        if name in replaced or name in written:
            continue
        if path.is_dir():
            shutil.copytree(path, staging / name, symlinks=True)
        else:
            try:
                os.link(path, staging / name, follow_symlinks=False)
            except OSError:
                shutil.copy2(path, staging / name, follow_symlinks=False)
    if exchange_paths(staging, export_dir):  # staging now holds the previous folder
        return
    for fname in written:
        os.replace(staging / fname, export_dir / fname)
    for fname in replaced - set(written):
        (export_dir / fname).unlink()


def check_export_target(
    model: nn.Module, export_dir: str | os.PathLike[str], dtype: torch.dtype, max_shard_size: int
) -> None:
    """Raise before any work when the model, dtype, shard size or target directory cannot be used."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES.values())}, got {dtype}")
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"a Hugging Face checkpoint needs a transformers PreTrainedModel with a .config; got "
            f"{type(model).__name__}"
        )
    check_export_dir(export_dir)


def check_export_dir(export_dir: str | os.PathLike[str]) -> Path:
    """``export_dir`` as a Path, after checking that it can be created or replaced."""
    export_dir = Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise NotADirectoryError(f"export_dir {export_dir} exists and is not a directory")
    if not export_dir.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {export_dir}: directory {export_dir.parent} does not exist"
        )
    return export_dir


def checkpoint_texts(
    model: nn.Module, quantization_config: dict[str, Any], dtype: torch.dtype, extra: dict[str, str]
) -> dict[str, str]:
    """config.json (the model's config with ``quantization_config``, its transformers class and
    ``dtype``), the ``extra`` texts and generation_config.json (when the model has one)."""
    hf_config = copy.deepcopy(model.config)
    hf_config.quantization_config = quantization_config
    hf_config.architectures = [architecture(model)]
    hf_config.dtype = DTYPES[dtype]
    texts = {"config.json": hf_config.to_json_string(use_diff=True), **extra}
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        texts["generation_config.json"] = generation.to_json_string(use_diff=True)
    return texts


def write_checkpoint(
    export_dir: Path, tensors: dict[str, torch.Tensor], texts: dict[str, str], max_shard_size: int
) -> Path:
    """Write ``texts`` (file name -> JSON text) and the safetensors shards atomically."""
    return write_atomically(
        export_dir, lambda staging: _write_files(staging, tensors, texts, max_shard_size)
    )


def write_atomically(
    export_dir: Path, write: Callable[[Path], list[str]], stale: tuple[str, ...] = _HF_STALE
) -> Path:
    """Run ``write`` (returns the file names it wrote) in a private folder beside ``export_dir``, then :func:`install` them."""
    staging = atomic_temp(export_dir, directory=True)
    try:
        install(staging, export_dir, write(staging), stale)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return export_dir


@dataclass(frozen=True)
class PartWriter:
    """How a layout is written one part (decoder layer) at a time
    (:class:`quant_export.streamed_checkpoint.StreamedCheckpoint`)."""

    collect: Callable[[nn.Module, torch.dtype, Scope], tuple[dict[str, torch.Tensor], Any]]
    """``collect(model, dtype, scope)``: the part's tensors and what the config needs of it."""
    texts: Callable[[nn.Module, list[Any], torch.dtype], dict[str, str]]
    """``texts(model, parts, dtype)``: config.json and the layout's other texts."""
    pre_quant_scale: bool
    """Whether the layout holds pre-quant scales left unfolded."""
    to_json: Callable[[Any], dict[str, Any]]
    """What a part adds to the config, as JSON values (for ``--resume``)."""
    from_json: Callable[[dict[str, Any]], Any]

    def write(
        self,
        model: nn.Module,
        export_dir: str | os.PathLike[str],
        dtype: torch.dtype,
        max_shard_size: int,
        **options: Any,
    ) -> Path:
        """The whole model as one checkpoint in ``export_dir``, written atomically (the
        whole-model exporters' one path; ``options`` go to :attr:`texts`)."""
        check_export_target(model, export_dir, dtype, max_shard_size)
        with torch.no_grad():
            tensors, part = self.collect(model, dtype, None)
        texts = self.texts(model, [part], dtype, **options)
        return write_checkpoint(Path(export_dir), tensors, texts, max_shard_size)

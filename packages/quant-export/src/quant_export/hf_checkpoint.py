"""``export_hf_checkpoint``: a quant-core quantized Hugging Face model to a unified HF checkpoint.

The directory holds ``config.json`` (with a ``quantization_config`` block, ``quant_method``
``"modelopt"``), ``hf_quant_config.json`` (ModelOpt's ``{"producer", "quantization"}`` form),
``generation_config.json`` when the model has one, and ``model.safetensors`` (or shards plus
``model.safetensors.index.json``). Tensor names are the model's own; quantized layers carry the
codes and scales of :mod:`quant_export.hf_formats`, attention modules their KV-cache ``k_scale`` /
``v_scale``. This is the layout vLLM (``quantization="modelopt"`` / ``"modelopt_fp4"``),
SGLang and TensorRT-LLM's PyTorch backend read. Every quantizer is checked before anything is
written, and files are written through temporary names and ``os.replace``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from quant_core.atomic import atomic_temp
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export._version import __version__
from quant_export.deployable_check import check_deployable
from quant_export.engines import LOADERS, loaders_for
from quant_export.hf_formats import KV_QUANTIZERS, LayerExport, export_kv_scales, export_linear
from quant_export.output_folder import exchange_paths
from quant_export.quantizers import UnsupportedFormatError
from quant_export.schemes import config_groups, scheme_of

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_SHARD_SIZE = 5 * 2**30
SAFETENSORS_INDEX = "model.safetensors.index.json"


def quantizer_names(model: nn.Module) -> dict[str, nn.Module]:
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


def _changes_input(quantizer: nn.Module) -> bool:
    if isinstance(quantizer, SequentialQuantizer):
        return quantizer.is_enabled
    return quantizer.is_enabled or quantizer.pre_quant_scale is not None


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


class _Collected:
    """Tensors, per-layer formats and exclusions gathered from one model."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, LayerExport] = {}
        self.excluded: list[str] = []
        self.kv_algos: set[str] = set()
        self.consumed: set[str] = set()


def _linear(
    name: str,
    module: nn.Linear,
    state: dict[str, torch.Tensor],
    out: _Collected,
    replaced: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Record one Linear: its codes and scales, or (unquantized) its exclusion and folded scales."""
    layer = export_linear(name, module)
    if layer is not None:
        check_weight_stored(name, module, state)
        if layer.quant_algo == "W4A16_AWQ" and "pre_quant_scale" not in layer.tensors:
            # TensorRT-LLM's unfused W4A16_AWQ loader reads pre_quant_scale unconditionally
            # (tensorrt_llm/_torch/modules/linear.py, W4A16_AWQ_LinearMethod.load_weights_vanilla)
            layer.tensors["pre_quant_scale"] = torch.ones(module.weight.shape[-1])
        out.layers[name] = layer
        replaced[name] = layer.tensors
        out.consumed.update(layer.quantizers)
        return
    out.excluded.append(name)
    out.consumed.add(f"{name}.weight_quantizer")
    iq = getattr(module, "input_quantizer", None)
    scales = [getattr(module.weight_quantizer, "pre_quant_scale", None)]
    if isinstance(iq, TensorQuantizer):
        scales.append(iq.pre_quant_scale)
        out.consumed.add(f"{name}.input_quantizer")
    scales = [s for s in scales if s is not None]
    if scales:
        # An unquantized layer's pre-quant scales fold exactly: (x * s) W^T = x (W * s)^T.
        check_weight_stored(name, module, state)
        folded = module.weight.detach().float()
        for s in scales:
            folded = folded * s.float()
        replaced[name] = {"weight": folded}


def collect_hf(model: nn.Module, dtype: torch.dtype, scope: Scope = None) -> _Collected:
    """Gather every tensor of the modules ``scope`` selects (all by default) and their formats;
    raises UnsupportedFormatError before anything is written."""
    state = {k: v for k, v in model.state_dict().items() if in_scope(scope, k)}
    quantizers = {k: v for k, v in quantizer_names(model).items() if in_scope(scope, k)}
    out = _Collected()
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    modules = [(n, m) for n, m in model.named_modules() if in_scope(scope, n)]
    for name, module in tqdm(modules, desc="export hf", leave=False):
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(module, nn.Linear) and isinstance(wq, TensorQuantizer | SequentialQuantizer):
            _linear(name, module, state, out, replaced)
        if all(isinstance(getattr(module, q, None), TensorQuantizer) for q in KV_QUANTIZERS):
            algo, kv = export_kv_scales(name, module)
            out.consumed.update(f"{name}.{q}" for q in ("q_bmm_quantizer", *KV_QUANTIZERS))
            if algo is not None:
                out.kv_algos.add(algo)
                out.tensors.update(kv)
    for qname, quantizer in quantizers.items():
        if qname not in out.consumed and _changes_input(quantizer):
            raise UnsupportedFormatError(
                f"quantizer {qname} ({type(quantizer).__name__}: {quantizer.extra_repr()}) has no "
                "form in the Hugging Face checkpoint (only Linear weight/input quantizers and "
                "k/v_bmm_quantizers are exported)"
            )
    if len(out.kv_algos) > 1:
        raise UnsupportedFormatError(
            f"KV-cache formats differ across layers: {sorted(out.kv_algos)}"
        )
    out.tensors.update(plain_tensors(state, quantizers, replaced, set(out.layers), dtype))
    return out


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


def _quant_summary(parts: list[_Collected]) -> dict[str, Any]:
    """ModelOpt's ``quantization`` block: one quant_algo, or MIXED_PRECISION with per-layer entries."""
    layers = {name: layer for part in parts for name, layer in part.layers.items()}
    kv_algos = {algo for part in parts for algo in part.kv_algos}
    if len(kv_algos) > 1:
        raise UnsupportedFormatError(f"KV-cache formats differ across layers: {sorted(kv_algos)}")
    configs = {name: layer.layer_config() for name, layer in layers.items()}
    distinct = {json.dumps(c, sort_keys=True) for c in configs.values()}
    kv_algo = next(iter(kv_algos), None)
    summary: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    if len(distinct) == 1:
        summary.update(json.loads(distinct.pop()))
    elif distinct:
        summary["quant_algo"] = "MIXED_PRECISION"
        summary["quantized_layers"] = configs
    summary["exclude_modules"] = sorted(n for part in parts for n in part.excluded)
    schemes = {
        name: scheme_of(layer.kinds, layer.group_size, layer.quant_algo)
        for name, layer in layers.items()
    }
    if schemes:  # ModelOpt writes this too; vLLM reads it to tell W4A16 NVFP4 from W4A4
        groups, _ = config_groups(schemes)
        summary["config_groups"] = {
            k: {f: v for f, v in g.items() if f != "format"} for k, g in groups.items()
        }
    return summary


def quantization_config(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``.

    It carries ModelOpt's keys (``quant_algo``, ``kv_cache_quant_algo``, ``group_size``,
    ``exclude_modules``) and the compressed-tensors style keys vLLM reads from ``config.json``
    (``ignore``, ``kv_cache_scheme``), with ``quant_method`` ``"modelopt"``.
    """
    qc = {"quant_method": "modelopt", **summary}
    qc["ignore"] = list(summary["exclude_modules"])
    kv = summary["kv_cache_quant_algo"]
    if kv == "FP8":
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif kv == "INT8":
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "int"}
    elif kv is not None:
        qc["kv_cache_scheme"] = kv
    qc["producer"] = {"name": "quant-export", "version": __version__}
    return qc


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
    model: nn.Module, hf_config: Any, extra_texts: dict[str, str]
) -> dict[str, str]:
    """config.json, ``extra_texts`` and generation_config.json (when the model has one)."""
    texts = {"config.json": hf_config.to_json_string(use_diff=True), **extra_texts}
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


def export_hf_checkpoint(
    model: nn.Module,
    export_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    share_fused_scales: bool = True,
    engine: str | None = None,
) -> Path:
    """Write a quantized transformers model as a unified Hugging Face checkpoint in ``export_dir``.

    ``dtype`` (bfloat16, float16 or float32) is the type of every tensor left unquantized; scales
    stay float32 (NVFP4 block scales float8_e4m3fn). The model is only read: calibration already
    shared the scales of fused layers and folded pre-quant scales where it could
    (:func:`quant_core.make_deployable`); pre-quant scales that remain are written as
    ``pre_quant_scale``. A model whose fused layers (q/k/v, gate/up) disagree is refused, or with
    ``share_fused_scales=False`` written with a warning. ``engine`` (a key of
    :data:`quant_export.engines.LOADERS`) requires that engine to load the result; by default at
    least one must. Raises UnsupportedFormatError, naming the layer and quantizer, for any active
    quantizer without a checkpoint form, or naming the engines for a format none loads.
    """
    check_deployable(model, share_fused_scales=share_fused_scales)
    check_export_target(model, export_dir, dtype, max_shard_size)
    if engine is not None and engine not in LOADERS:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(LOADERS)}")
    with torch.no_grad():
        collected = collect_hf(model, dtype)
    texts = hf_texts(model, [collected], dtype, engine)
    return write_checkpoint(Path(export_dir), collected.tensors, texts, max_shard_size)


def hf_texts(
    model: nn.Module, parts: list[_Collected], dtype: torch.dtype, engine: str | None = None
) -> dict[str, str]:
    """config.json, hf_quant_config.json and generation_config.json of the checkpoint made of
    ``parts``; raises UnsupportedFormatError naming the engines for a format none loads."""
    summary = _quant_summary(parts)
    if summary["quant_algo"] is None and summary["kv_cache_quant_algo"] is None:
        warnings.warn(
            f"{type(model).__name__} has no quantized layer or KV cache; writing a plain checkpoint "
            "with quant_algo null",
            UserWarning,
            stacklevel=3,
        )
    algos = {layer.quant_algo for part in parts for layer in part.layers.values()}
    if algos or summary["kv_cache_quant_algo"]:
        loaders = loaders_for(algos, summary["kv_cache_quant_algo"], engine)
    else:
        loaders = list(LOADERS)
    hf_config = copy.deepcopy(model.config)
    hf_config.quantization_config = quantization_config(summary)
    hf_config.architectures = [architecture(model)]
    hf_config.dtype = DTYPES[dtype]
    producer = {"name": "quant-export", "version": __version__}
    extra = {
        "hf_quant_config.json": json.dumps(
            {"producer": producer, "quantization": summary, "loaders": loaders}, indent=4
        )
    }
    return checkpoint_texts(model, hf_config, extra)

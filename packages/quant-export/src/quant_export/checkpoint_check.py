"""``quant-export inspect`` / ``validate``: read a written checkpoint folder and check it.

Each layout of :data:`quant_export.layouts.LAYOUTS` recognises its folders and checks them (its
row's recogniser and validator): both Hugging Face layouts (compressed-tensors and ModelOpt, whose
validators live here), ONNX folders, onnxruntime-genai folders and TensorRT-LLM checkpoints.
:func:`validate` checks what a loader relies on: the config parses (compressed-tensors' own
``QuantizationConfig`` for that layout), every scale is finite and positive, group sizes divide the
weights' input sizes and match the config, every quantized layer has the tensors its format needs
with the dtypes an engine reads (``weight_scale``, ``input_scale``, float8 NVFP4 block scales,
...), ``hf_quant_config.json`` agrees with ``config.json``, a layer whose counterparts in the other
blocks are quantized is not silently float, and ignored / excluded layers hold plain weights. :func:`inspect` describes the folder in a few lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quant_export.quantizers import UnsupportedFormatError

_SCALE_SUFFIXES = ("_scale", "_scale_2", "_global_scale", "pre_quant_scale", "k_scale", "v_scale")


class CheckpointError(UnsupportedFormatError):
    """A checkpoint folder that a loader would reject or misread."""


class _Tensors(Mapping[str, torch.Tensor]):
    """The tensors of a folder's safetensors files as their headers describe them:
    ``tensors[key]`` is a ``meta`` tensor of the stored dtype and shape (no data is read), and
    :meth:`value` reads one. Checking a checkpoint reads only the scales it checks the values of,
    so a checkpoint larger than memory is checked in one pass over its headers."""

    def __init__(self, folder: Path) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
        self._where: dict[str, Path] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    self._where[key] = path
                    self._meta[key] = _header(f, key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._meta[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def value(self, key: str) -> torch.Tensor:
        """The stored tensor ``key``, read from its file."""
        with safe_open(str(self._where[key]), "pt") as f:
            return f.get_tensor(key)


def _header(f: Any, key: str) -> torch.Tensor:
    """A ``meta`` tensor with the dtype and shape of ``key`` in the open safetensors file ``f``
    (an empty slice gives the dtype without reading data; a 0-d tensor is read, it is one value)."""
    part = f.get_slice(key)
    shape = part.get_shape()
    dtype = part[0:0].dtype if shape else f.get_tensor(key).dtype
    return torch.empty(shape, dtype=dtype, device="meta")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a corrupted or non-object file is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is corrupted") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _quant_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of ``folder/config.json`` (None without one)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    qc = read_json(config_path).get("quantization_config")
    return qc.get("quant_method") if isinstance(qc, dict) else None


def is_compressed_tensors(folder: Path) -> bool:
    """Whether ``folder`` is a compressed-tensors checkpoint (the registry's recogniser)."""
    return _quant_method(folder) == "compressed-tensors"


def is_modelopt(folder: Path) -> bool:
    """Whether ``folder`` is a ModelOpt-layout Hugging Face checkpoint (the registry's recogniser)."""
    return _quant_method(folder) == "modelopt"


def layout_of(folder: Path) -> str:
    """The registry name (:data:`quant_export.layouts.LAYOUTS`) of the checkpoint in ``folder``;
    CheckpointError for a folder no layout recognises."""
    from quant_export.layouts import LAYOUTS

    folder = Path(folder)
    for name, row in LAYOUTS.items():
        if row.recognises(folder):
            return name
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json or model.onnx (not a checkpoint folder)")
    qc = read_json(config_path).get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise CheckpointError(f"{folder}: config.json has no quantization_config.quant_method")
    raise CheckpointError(
        f"{folder}: quant_method {qc['quant_method']!r} is not one this tool writes"
    )


def _check_scales(tensors: _Tensors) -> None:
    for name, header in tensors.items():
        if name.endswith(_SCALE_SUFFIXES) and header.is_floating_point():
            v = tensors.value(name).float()
            if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
                raise CheckpointError(f"{name}: scales must be finite and positive")


# a tensor leaf that only a quantized layer holds
_QUANT_LEAVES = (
    "weight_scale", "weight_packed", "weight_shape", "weight_global_scale", "input_scale",
    "input_global_scale", "weight_scale_2", "weight_zero_point",
)  # fmt: skip
_CODE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32)
_FLOAT_SCALE = (torch.float32, torch.float16, torch.bfloat16)


def _quantized_layers(tensors: _Tensors) -> set[str]:
    """Layers that hold a quantized tensor: a scale or packed leaf, or a ``weight`` stored as codes."""
    out = set()
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf in _QUANT_LEAVES or (leaf == "weight" and value.dtype in _CODE_DTYPES):
            out.add(layer)
    return out


def _is_ignored(patterns: list[str]) -> Any:
    import fnmatch
    import re

    def ignored(name: str) -> bool:
        for pattern in patterns:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif name == pattern or fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    return ignored


def _role(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.#.mlp.up_proj``: the same layer in every block."""
    return ".".join("#" if part.isdigit() else part for part in name.split("."))


def _check_siblings(quantized: set[str], tensors: _Tensors, ignored: Any) -> None:
    """A float 2-D weight whose counterpart in the other blocks is quantized, and that is not ignored,
    lost its quantized form (a deleted scale, a hand-edited file)."""
    roles = {_role(n) for n in quantized}
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf != "weight" or value.dim() != 2 or layer in quantized or ignored(layer):
            continue
        if _role(layer) in roles:
            raise CheckpointError(
                f"{layer}: stored unquantized and not in the ignore list, while the same layer of "
                "the other blocks is quantized (its scales are missing); re-export the checkpoint"
            )


def _need(name: str, leaf: str, tensors: _Tensors, dtypes: tuple, what: str) -> torch.Tensor:
    key = f"{name}.{leaf}"
    if key not in tensors:
        raise CheckpointError(
            f"{name}: {what} needs {leaf}, which is missing; re-export the checkpoint"
        )
    value = tensors[key]
    if value.dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(
            f"{key} is {str(value.dtype).removeprefix('torch.')}, but {what} stores it as {expected}"
        )
    return value


def _ct_group(qc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The compressed-tensors config group that targets layer ``name`` (exact / ``re:`` targets first)."""
    import re

    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    for group in groups:
        for target in group.get("targets") or []:
            if target == name or (target.startswith("re:") and re.match(target[3:], name)):
                return group
    return next((g for g in groups if "Linear" in (g.get("targets") or [])), None)


def _check_group(name: str, scale: torch.Tensor, in_features: int, group: int | None) -> None:
    if group and scale.dim() == 2 and scale.shape[-1] * group != in_features:
        raise CheckpointError(
            f"{name}: the config says group size {group}, but weight_scale holds {scale.shape[-1]} "
            f"groups for input size {in_features} (group size {in_features // max(scale.shape[-1], 1)})"
        )


def _check_ct_layer(
    name: str, group: dict[str, Any], qc: dict[str, Any], tensors: _Tensors
) -> None:
    """The tensors one compressed-tensors layer needs for its group's format, with their dtypes."""
    fmt = group.get("format") or qc.get("format")
    weights = group.get("weights") or {}
    activations = group.get("input_activations") or None
    static_input = activations is not None and activations.get("dynamic") is False
    what = f"the {fmt} format"
    if fmt == "float-quantized":
        _need(name, "weight", tensors, (torch.float8_e4m3fn,), what)
        _need(name, "weight_scale", tensors, _FLOAT_SCALE, what)
        if static_input:
            _need(name, "input_scale", tensors, _FLOAT_SCALE, what)
    elif fmt == "int-quantized":
        _need(name, "weight", tensors, (torch.int8,), what)
        _need(name, "weight_scale", tensors, _FLOAT_SCALE, what)
        if static_input:
            _need(name, "input_scale", tensors, _FLOAT_SCALE, what)
    elif fmt == "pack-quantized":
        _need(name, "weight_packed", tensors, (torch.int32,), what)
        _need(name, "weight_shape", tensors, (torch.int32, torch.int64), what)
        scale = _need(name, "weight_scale", tensors, _FLOAT_SCALE, what)
        if weights.get("strategy") == "group":
            in_features = int(tensors.value(f"{name}.weight_shape")[-1])
            _check_group(name, scale, in_features, weights.get("group_size"))
    elif fmt == "nvfp4-pack-quantized":
        packed = _need(name, "weight_packed", tensors, (torch.uint8,), what)
        scale = _need(
            name, "weight_scale", tensors, (torch.float8_e4m3fn,), what + " (block scales)"
        )
        _need(name, "weight_global_scale", tensors, (torch.float32,), what)
        _check_group(name, scale, packed.shape[-1] * 2, weights.get("group_size") or 16)
        if activations is not None:
            _need(name, "input_global_scale", tensors, (torch.float32,), what)


def _check_modelopt_layer(name: str, algo: str, group: int | None, tensors: _Tensors) -> None:
    """The tensors one ModelOpt-layout layer needs for its ``quant_algo``, with their dtypes."""
    what = f"quant_algo {algo}"
    f32 = (torch.float32,)
    if algo == "FP8":
        _need(name, "weight", tensors, (torch.float8_e4m3fn,), what)
        _need(name, "weight_scale", tensors, f32, what)
        _need(name, "input_scale", tensors, f32, what)
    elif algo == "FP8_PER_CHANNEL_PER_TOKEN":
        _need(name, "weight", tensors, (torch.float8_e4m3fn,), what)
        _need(name, "weight_scale", tensors, f32, what)
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        weight = _need(name, "weight", tensors, (torch.uint8,), what)
        scale = _need(
            name, "weight_scale", tensors, (torch.float8_e4m3fn,), what + " (block scales)"
        )
        _need(name, "weight_scale_2", tensors, f32, what)
        if algo == "NVFP4":
            _need(name, "input_scale", tensors, f32, what)
        _check_group(name, scale, weight.shape[-1] * 2, group or 16)
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        weight = _need(name, "weight", tensors, (torch.uint8, torch.int8), what)
        scale = _need(name, "weight_scale", tensors, (torch.float32, torch.float16), what)
        _check_group(name, scale, weight.shape[-1], group)
        if algo == "W4A8_AWQ":
            _need(name, "input_scale", tensors, f32, what)


def _check_ct(qc: dict[str, Any], tensors: _Tensors) -> list[str]:
    from compressed_tensors.quantization import QuantizationConfig

    try:
        config = QuantizationConfig.model_validate(qc)
    except ValueError as err:
        raise CheckpointError(
            f"quantization_config is not valid compressed-tensors: {err}"
        ) from err
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    for name in layers:
        scale = tensors[f"{name}.weight_scale"]
        weight = tensors.get(f"{name}.weight")
        if f"{name}.weight_shape" in tensors:
            in_features = int(tensors.value(f"{name}.weight_shape")[-1])
        elif weight is not None:
            in_features = weight.shape[-1]
        else:  # NVFP4: two E2M1 codes per uint8
            in_features = tensors[f"{name}.weight_packed"].shape[-1] * 2
        if scale.dim() == 2 and scale.shape[-1] > 1 and in_features % scale.shape[-1]:
            raise CheckpointError(
                f"{name}: {scale.shape[-1]} groups do not divide input size {in_features}"
            )
    for name in config.ignore or []:
        if f"{name}.weight_scale" in tensors:
            raise CheckpointError(f"{name} is in ignore but stored quantized")
    quantized = _quantized_layers(tensors)
    for name in sorted(quantized):
        group = _ct_group(qc, name)
        if group is not None:
            _check_ct_layer(name, group, qc, tensors)
    _check_siblings(quantized, tensors, _is_ignored(list(config.ignore or [])))
    return sorted(quantized)


def _check_modelopt(qc: dict[str, Any], tensors: _Tensors) -> list[str]:
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    group = qc.get("group_size")
    for name in layers:
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        if weight.dtype == torch.uint8 and scale.dim() == 2 and group:
            in_features = weight.shape[-1] * (2 if weight.shape[0] == scale.shape[0] else 1)
            if in_features % group:
                raise CheckpointError(f"{name}: group size {group} does not divide {in_features}")
    for name in qc.get("exclude_modules") or []:
        if f"{name}.weight_scale" in tensors:
            raise CheckpointError(f"{name} is excluded but stored quantized")
    quantized = _quantized_layers(tensors)
    per_layer = qc.get("quantized_layers") or {}
    for name in sorted(quantized):
        algo = (per_layer.get(name) or {}).get("quant_algo") if per_layer else qc.get("quant_algo")
        group_size = (per_layer.get(name) or {}).get("group_size", group) if per_layer else group
        if algo is not None:
            _check_modelopt_layer(name, algo, group_size, tensors)
    _check_siblings(quantized, tensors, _is_ignored(list(qc.get("exclude_modules") or [])))
    return sorted(quantized)


def _hf_checked(folder: Path) -> tuple[dict[str, Any], _Tensors]:
    """The ``quantization_config`` of a Hugging Face checkpoint and its tensors, scales checked."""
    qc = read_json(folder / "config.json")["quantization_config"]
    tensors = _Tensors(folder)
    _check_scales(tensors)
    return qc, tensors


def _described(folder: Path, qc: dict[str, Any], layers: list[str], **info: Any) -> dict[str, Any]:
    if not layers and not qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{folder}: no quantized layer and no KV-cache scheme")
    return {"layers": layers, "kv_cache": qc.get("kv_cache_scheme"), **info}


def validate_compressed_tensors(folder: Path) -> dict[str, Any]:
    """Check a compressed-tensors checkpoint (the registry's validator)."""
    from quant_export.layouts import LAYOUTS

    qc, tensors = _hf_checked(folder)
    layers = _check_ct(qc, tensors)
    formats = sorted({g.get("format") or qc.get("format") for g in qc["config_groups"].values()})
    loaders = list(LAYOUTS["compressed-tensors"].engines)
    config = read_json(folder / "config.json")
    if (
        "nvfp4-pack-quantized" in formats
        and (config.get("dtype") or config.get("torch_dtype")) == "float32"
    ):
        loaders = loaders[:2]  # stock transformers fails on float32 NVFP4 files
    return _described(folder, qc, layers, formats=formats, ignored=qc.get("ignore") or [],
                      loaders=loaders, tensors=len(tensors))  # fmt: skip


def validate_modelopt(folder: Path) -> dict[str, Any]:
    """Check a ModelOpt-layout Hugging Face checkpoint (the registry's validator)."""
    qc, tensors = _hf_checked(folder)
    layers = _check_modelopt(qc, tensors)
    algo = qc.get("quant_algo")
    formats = sorted({v["quant_algo"] for v in qc.get("quantized_layers", {}).values()}) or [algo]
    hf_quant = folder / "hf_quant_config.json"
    loaders = read_json(hf_quant).get("loaders", []) if hf_quant.is_file() else []
    if hf_quant.is_file():
        said = (read_json(hf_quant).get("quantization") or {}).get("quant_algo")
        if said != algo:
            raise CheckpointError(
                f"{folder}: hf_quant_config.json says quant_algo {said}, config.json says "
                f"{algo} (vLLM and TensorRT-LLM read hf_quant_config.json); re-export the checkpoint"
            )
    return _described(folder, qc, layers, formats=formats, ignored=qc.get("exclude_modules") or [],
                      loaders=loaders, tensors=len(tensors))  # fmt: skip


def validate(folder: str | Path) -> dict[str, Any]:
    """Check the checkpoint in ``folder`` with its layout's validator (the registry row that
    recognises it); raises CheckpointError naming the first problem.

    Returns a description (layout, quantized layers, formats, ignored layers, loaders).
    """
    from quant_export.layouts import LAYOUTS

    folder = Path(folder)
    row = LAYOUTS[layout_of(folder)]
    try:
        return row.validate(folder)
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def is_tensorrt_llm(folder: str | Path) -> bool:
    """True when ``folder`` looks like a TensorRT-LLM checkpoint (rank files, config with a mapping)."""
    folder = Path(folder)
    if not any(folder.glob("rank*.safetensors")) or not (folder / "config.json").is_file():
        return False
    config = read_json(folder / "config.json")
    return "mapping" in config and "architecture" in config


def _inspect_tensorrt_llm(folder: Path) -> list[str]:
    from quant_export.tensorrt_llm import validate_tensorrt_llm_checkpoint

    try:
        cfg = validate_tensorrt_llm_checkpoint(folder)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    quant, mapping = cfg["quantization"], cfg["mapping"]
    return [
        "layout      tensorrt-llm checkpoint (trtllm-build --checkpoint_dir)",
        f"model       {cfg['architecture']}, {cfg['num_hidden_layers']} layers, dtype {cfg['dtype']}",
        f"formats     {quant.get('quant_algo') or 'none'}",
        f"left float  {', '.join(quant.get('exclude_modules') or []) or 'none'}",
        f"KV cache    {quant.get('kv_cache_quant_algo') or 'none'}",
        f"ranks       tp {mapping['tp_size']} x pp {mapping['pp_size']}",
        "loaders     tensorrt_llm (trtllm-build)",
    ]


def _plain_model(folder: Path) -> list[str] | None:
    """Lines describing an unquantized Hugging Face model folder; None for anything else."""
    config_path = folder / "config.json"
    if not config_path.is_file() or (folder / "model.onnx").is_file():
        return None
    config = read_json(config_path)
    if "quantization_config" in config or "mapping" in config:
        return None
    weights = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(
        p.name for p in folder.glob("*.bin")
    )
    tokenizer = [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()]
    return [
        "layout      Hugging Face model, not quantized (quant-export quantize --model reads it)",
        f"model       {', '.join(config.get('architectures') or ['?'])}, dtype "
        f"{config.get('dtype') or config.get('torch_dtype') or '?'}",
        f"weights     {', '.join(weights[:3]) or 'none'}{' ...' if len(weights) > 3 else ''}",
        f"tokenizer   {', '.join(tokenizer) or 'none'}",
    ]


def inspect(folder: str | Path) -> list[str]:
    """A few printable lines describing the checkpoint in ``folder`` (validated first).

    Hugging Face layouts (compressed-tensors, ModelOpt), ONNX folders and TensorRT-LLM checkpoints
    are recognised.
    """
    if is_tensorrt_llm(folder):
        return _inspect_tensorrt_llm(Path(folder))
    plain = _plain_model(Path(folder))
    if plain is not None:
        return plain
    info = validate(folder)
    kv = info.get("kv_cache")
    kv_text = (
        "none"
        if not kv
        else (kv if isinstance(kv, str) else f"{kv.get('type')}{kv.get('num_bits')}")
    )
    return [
        f"layout      {info['layout']}",
        f"formats     {', '.join(str(f) for f in info.get('formats', [])) or '-'}",
        f"quantized   {len(info['layers'])} layers ({info.get('tensors', 0)} tensors)",
        f"left float  {', '.join(info.get('ignored', [])) or 'none'}",
        f"KV cache    {kv_text}",
        f"loaders     {', '.join(info['loaders'])}",
    ]

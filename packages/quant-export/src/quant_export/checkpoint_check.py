"""``quant-export inspect`` / ``validate``: read a written checkpoint folder and check it.

Both layouts (compressed-tensors and ModelOpt) and ONNX folders are recognised from their files.
:func:`validate` checks what a loader relies on: the config parses (compressed-tensors' own
``QuantizationConfig`` for that layout), every scale is finite and positive, group sizes divide the
weights' input sizes, every quantized layer has its scales, and ignored / excluded layers hold
plain weights. :func:`inspect` describes the folder in a few lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quant_export.quantizers import UnsupportedFormatError

_SCALE_SUFFIXES = ("_scale", "_scale_2", "_global_scale", "pre_quant_scale", "k_scale", "v_scale")


class CheckpointError(UnsupportedFormatError):
    """A checkpoint folder that a loader would reject or misread."""


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    out = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a corrupted or non-object file is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the file is corrupted") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def layout_of(folder: Path) -> tuple[str, dict[str, Any]]:
    """(layout name, quantization_config block) of a checkpoint folder."""
    folder = Path(folder)
    if (folder / "model.onnx").is_file():
        return "onnx", {}
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json or model.onnx (not a checkpoint folder)")
    qc = read_json(config_path).get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise CheckpointError(f"{folder}: config.json has no quantization_config.quant_method")
    method = qc["quant_method"]
    if method not in ("compressed-tensors", "modelopt"):
        raise CheckpointError(f"{folder}: quant_method {method!r} is not one this tool writes")
    return method, qc


def _check_scales(tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        if name.endswith(_SCALE_SUFFIXES) and value.is_floating_point():
            v = value.float()
            if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
                raise CheckpointError(f"{name}: scales must be finite and positive")


def _check_ct(qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
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
        shape = tensors.get(f"{name}.weight_shape")
        if shape is not None:
            in_features = int(shape[-1])
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
    return layers


def _check_modelopt(qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
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
    return layers


def validate(folder: str | Path) -> dict[str, Any]:
    """Check the checkpoint in ``folder``; raises CheckpointError naming the first problem.

    Returns a description (layout, quantized layers, formats, ignored layers, loaders).
    """
    folder = Path(folder)
    layout, qc = layout_of(folder)
    if layout == "onnx":
        import onnx

        onnx.checker.check_model(str(folder / "model.onnx"))
        return {"layout": "onnx", "layers": [], "loaders": ["onnxruntime", "TensorRT"]}
    tensors = _tensors(folder)
    _check_scales(tensors)
    if layout == "compressed-tensors":
        layers = _check_ct(qc, tensors)
        formats = sorted(
            {g.get("format") or qc.get("format") for g in qc["config_groups"].values()}
        )
        ignored = qc.get("ignore") or []
        loaders = ["vllm", "sglang", "transformers (compressed-tensors)"]
    else:
        layers = _check_modelopt(qc, tensors)
        algo = qc.get("quant_algo")
        formats = sorted({v["quant_algo"] for v in qc.get("quantized_layers", {}).values()}) or [
            algo
        ]
        ignored = qc.get("exclude_modules") or []
        hf_quant = folder / "hf_quant_config.json"
        loaders = read_json(hf_quant).get("loaders", []) if hf_quant.is_file() else []
    if not layers and not qc.get("kv_cache_scheme"):
        raise CheckpointError(f"{folder}: no quantized layer and no KV-cache scheme")
    return {
        "layout": layout,
        "layers": layers,
        "formats": formats,
        "kv_cache": qc.get("kv_cache_scheme"),
        "ignored": ignored,
        "loaders": loaders,
        "tensors": len(tensors),
    }


def inspect(folder: str | Path) -> list[str]:
    """A few printable lines describing the checkpoint in ``folder`` (validated first)."""
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

"""Quantization schemes in compressed-tensors' vocabulary (``QuantizationArgs`` fields) per weight / input format.

The compressed-tensors exporter writes them as its ``config_groups``; the ModelOpt-layout exporter
writes the same block beside ``quant_algo``, as ModelOpt does (vLLM's ModelOpt loader reads it to
tell weight-only NVFP4 from W4A4). Keys are the weight / input kinds of
:func:`quant_export.hf_formats.weight_kind` / :func:`~quant_export.hf_formats.input_kind`.
"""

from __future__ import annotations

from typing import Any

from quant_export.hf_formats import Kind

# Weight kind -> QuantizationArgs fields (a weight kind is hf_formats.weight_kind's row).
WEIGHT_ARGS: dict[Kind, dict[str, Any]] = {
    Kind.FP8_TENSOR: {"num_bits": 8, "type": "float", "strategy": "tensor"},
    Kind.FP8_CHANNEL: {"num_bits": 8, "type": "float", "strategy": "channel"},
    Kind.INT8_CHANNEL: {"num_bits": 8, "type": "int", "strategy": "channel"},
    Kind.INT4_BLOCK: {"num_bits": 4, "type": "int", "strategy": "group"},
    Kind.NVFP4: {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": 16,
        "scale_dtype": "float8_e4m3fn",
        "zp_dtype": "float8_e4m3fn",
    },
}
# Input kind -> QuantizationArgs fields (None: weight-only).
INPUT_ARGS: dict[Kind, dict[str, Any] | None] = {
    Kind.OFF: None,
    Kind.FP8_TENSOR: {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
    Kind.FP8_TOKEN: {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
    Kind.INT8_TENSOR: {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False},
    Kind.NVFP4: {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": "local",
        "scale_dtype": "float8_e4m3fn",
        "zp_dtype": "float8_e4m3fn",
    },
}


def config_groups(schemes_by_layer: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """``config_groups`` (one group per distinct scheme; targets ``Linear`` when there is one) and the format.

    ``schemes_by_layer`` maps layer names to their scheme fields (``weights``,
    ``input_activations``, ``format``); the format is the common one or ``mixed-precision``.
    """
    schemes: list[tuple[dict, list[str]]] = []
    for name, scheme in schemes_by_layer.items():
        for fields, names in schemes:
            if fields == scheme:
                names.append(name)
                break
        else:
            schemes.append((scheme, [name]))
    groups = {}
    for index, (fields, names) in enumerate(schemes):
        targets = ["Linear"] if len(schemes) == 1 else names
        groups[f"group_{index}"] = {"targets": targets, **fields}
    formats = {fields["format"] for fields, _ in schemes}
    return groups, formats.pop() if len(formats) == 1 else "mixed-precision"


def scheme_of(kinds: tuple[Kind, Kind], group_size: int | None, fmt: str) -> dict[str, Any]:
    """Scheme fields of a layer whose weight and input have ``kinds``; ``group_size`` for INT blocks."""
    weights = dict(WEIGHT_ARGS[kinds[0]])
    if weights["strategy"] == "group":
        weights["group_size"] = group_size
    return {"weights": weights, "input_activations": INPUT_ARGS[kinds[1]], "format": fmt}

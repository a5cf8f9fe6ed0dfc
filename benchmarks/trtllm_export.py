"""TensorRT-LLM checkpoints of the real SmolLM2-135M-Instruct: export time, rank sizes, and the logits a reader rebuilds.

For each config: quantize (max calibration on 2 x 64 random tokens, per-token fallback off, since
TensorRT-LLM has no per-tensor-weight / per-token-input FP8 layer), export at tensor parallel 1
and 3 (SmolLM2 has 9 heads and 3 KV heads), and rebuild the fake-quant model from the float32
files with the test reader (``tests/export/trtllm_reader.py``, written from TensorRT-LLM's side).
Columns: export seconds (float16 files), total size of the rank files, max |logit difference|
between the rebuilt and the in-memory model, and, for scale, between the in-memory model and the
float model.

    python benchmarks/trtllm_export.py [--configs FP8+FP8_KV,INT8_SQ,NVFP4]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import quant_core as mtq
from quant_export import export_tensorrt_llm_checkpoint
from quant_llm import with_kv_cache
from quant_llm.testing.real_models import load_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from trtllm_reader import rebuild

CONFIGS = {
    "FP8+FP8_KV": with_kv_cache(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG),
    "INT8_SQ": mtq.INT8_SMOOTHQUANT_CFG,
    "NVFP4": mtq.NVFP4_DEFAULT_CFG,
}


def _model() -> torch.nn.Module:
    loaded = load_smollm2()
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return model.float().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    print("| config | tp | export s | rank files MB | rebuilt vs model | model vs float |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        float_logits = _model()(input_ids=ids).logits
    for name in args.configs.split(","):
        model = _model()
        cfg = copy.deepcopy(dict(CONFIGS[name]))
        if cfg["algorithm"] in ("max", "gptq"):
            cfg["algorithm"] = {"method": "max", "per_token_fallback_db": None}
        mtq.quantize(model, cfg, lambda m: m(input_ids=ids))
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            for tp in (1, 3):
                start = time.perf_counter()
                folder = export_tensorrt_llm_checkpoint(
                    model, "llama", torch.float16, Path(tmp) / f"f16_{tp}", tp
                )
                seconds = time.perf_counter() - start
                size = sum(p.stat().st_size for p in folder.glob("rank*.safetensors")) / 1e6
                exact = export_tensorrt_llm_checkpoint(
                    model, "llama", torch.float32, Path(tmp) / f"f32_{tp}", tp
                )
                expected = model(input_ids=ids).logits
                rebuilt = rebuild(exact, _model())(input_ids=ids).logits
                diff = (rebuilt - expected).abs().max().item()
                print(
                    f"| {name} | {tp} | {seconds:.1f} | {size:.1f} | {diff:.2e} | "
                    f"{(expected - float_logits).abs().max().item():.2f} |"
                )


if __name__ == "__main__":
    main()

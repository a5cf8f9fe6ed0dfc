"""Round-to-nearest INT4 weight-only on SmolLM2-135M: why ours trailed llm-compressor's (issue #30 item 2).

Every row quantizes the same layers (every decoder Linear; ``lm_head``, tied to the embeddings,
and the embeddings stay float in both tools) to INT4 in groups of ``--group`` input columns and
rounds each weight to the nearest code; the rows differ only in how a group's scale is chosen:

* ``quant ...`` rows run quant's configs (``mtq.quantize``, calibrated on 16 x 256 tokens of
  *Emma*; weight-only, so the data does not change the weights);
* ``ref ...`` rows set the weights from a float64 formula written here (independent of quant):
  ``modelopt`` is ModelOpt's / quant's max calibration ``s = absmax / 7``, codes clamped to
  [-8, 7] (with ``s = absmax / 7`` the code -8 is never reached: 15 levels);
  ``compressed-tensors`` is llm-compressor's W4A16 RTN (``QuantizationModifier(scheme="W4A16")``,
  min-max observer, compressed-tensors' ``calculate_qparams``): ``s = absmax / ((7 - (-8)) / 2)``
  ``= absmax / 7.5``, codes ``clamp(round_half_even(w / s), -8, 7)`` (16 levels: the largest
  positive weight is clipped to ``7 s``);
  ``absmax/8`` clamps to [-8, 7] with ``s = absmax / 8``;
  ``asymmetric`` is compressed-tensors' ``symmetric=False``: ``s = (max - min) / 15``,
  ``zp = round(-8 - min / s)``;
  ``bf16 scale`` rounds ``s`` to bfloat16 (the scale dtype of a bfloat16 model / export).

Perplexity is measured as in ``benchmarks/llm_perplexity.py`` and ``benchmarks/accuracy.py``:
``--windows`` windows of ``--seq-len`` tokens of *Pride and Prejudice* (20 x 1,024 there).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/int4_rtn.py [--windows 20] [--rows "a;b"]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _int4 import with_group
from torch import nn

import quant_core as mtq
from quant_llm import create_forward_loop, get_calib_dataloader, perplexity
from quant_llm.testing.real_models import load_smollm2

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.double().reshape(w.shape[0], -1, group)


def _symmetric(divisor: float, bf16: bool = False) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def quantize(w: torch.Tensor, group: int) -> torch.Tensor:
        g = _groups(w, group)
        scale = g.abs().amax(-1, keepdim=True) / divisor
        if bf16:
            scale = scale.to(torch.bfloat16).double()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape)

    return quantize


def _asymmetric(w: torch.Tensor, group: int) -> torch.Tensor:
    g = _groups(w, group)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round((-8 - lo / scale).clamp(-8, 7))
    q = (torch.round(g / scale) + zp).clamp(-8, 7)
    return ((q - zp) * scale).reshape(w.shape)


REFERENCES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "ref modelopt absmax/7": _symmetric(7.0),
    "ref modelopt absmax/7 (bf16 scale)": _symmetric(7.0, bf16=True),
    "ref compressed-tensors absmax/7.5": _symmetric(7.5),
    "ref compressed-tensors absmax/7.5 (bf16 scale)": _symmetric(7.5, bf16=True),
    "ref absmax/8": _symmetric(8.0),
    "ref asymmetric (min/max, zero point)": _asymmetric,
}


def quant_rows(group: int) -> dict[str, dict]:
    """quant's configs at ``group``: the shipped preset and its algorithm choices."""
    base = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
    return {
        "quant INT4_BLOCKWISE_WEIGHT_ONLY_CFG": with_group(base, group),
        "quant algorithm max (ModelOpt's)": with_group(base, group, "max"),
        "quant algorithm mse": with_group(base, group, "mse"),
        "quant algorithm mse 1.0..0.8": with_group(
            base, group, {"method": "mse", "start_multiplier": 0.8, "num_steps": 17}
        ),
        "quant algorithm local_hessian 0.5..1.0": with_group(
            base,
            group,
            {
                "method": "local_hessian",
                "start_multiplier": 0.5,
                "stop_multiplier": 1.0,
                "step_size": 0.0125,
            },
        ),
    }


def _reference_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers both tools quantize: all but the LM head (tied to the embeddings)."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n
    }


def _export_and_reload(model: nn.Module, folder: Path, dtype: torch.dtype) -> nn.Module:
    """``model`` written as a compressed-tensors checkpoint and loaded back by transformers (as
    float32, the weights decompressed)."""
    import transformers

    from quant_export.compressed_tensors_export import export_compressed_tensors

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = export_compressed_tensors(model, folder, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main() -> None:
    """Quantize SmolLM2 with each row's scale rule, measure held-out perplexity, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--rows", default=None, help="row names separated by ; (default: all)")
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="also export each quant row to compressed-tensors under this folder (float32 and "
        "bfloat16) and measure the checkpoint transformers reloads",
    )
    args = parser.parse_args()
    configs = quant_rows(args.group)
    names = ["fp32", *configs, *REFERENCES]
    if args.rows:
        names = [n for n in names if n in args.rows.split(";")]

    _, tokenizer = load_smollm2()
    calib = get_calib_dataloader(tokenizer, DATA / "austen_emma.txt", 16, 256, 4)
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")
    rows = []
    for name in names:
        model, _ = load_smollm2()
        start = time.process_time()
        with torch.no_grad():
            if name in configs:
                mtq.quantize(model, configs[name], create_forward_loop(model, calib))
                count = sum(
                    1
                    for m in model.modules()
                    if isinstance(m, nn.Linear) and m.weight_quantizer.is_enabled
                )
            elif name in REFERENCES:
                layers = _reference_layers(model)
                for m in layers.values():
                    m.weight.copy_(REFERENCES[name](m.weight, args.group).to(m.weight.dtype))
                count = len(layers)
            else:
                count = 0
        cpu = time.process_time() - start
        ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, num_windows=args.windows)
        rows.append((name, ppl, count, cpu))
        print(f"{name}: perplexity {ppl:.3f}, {count} layers, {cpu:.1f} CPU s", flush=True)
        if args.export is not None and name in configs:
            for dtype in (torch.float32, torch.bfloat16):
                reloaded = _export_and_reload(
                    model, args.export / f"{len(rows)}_{str(dtype)[6:]}", dtype
                )
                ppl = perplexity(
                    reloaded, tokenizer, text, seq_len=args.seq_len, num_windows=args.windows
                )
                rows.append((f"{name}, reloaded from its {str(dtype)[6:]} export", ppl, count, 0.0))
                print(f"{rows[-1][0]}: perplexity {ppl:.3f}", flush=True)
        del model

    base = next((p for n, p, _c, _s in rows if n == "fp32"), None)
    print(
        f"\nSmolLM2-135M-Instruct, INT4 weight-only group {args.group}, round to nearest; "
        f"perplexity on {args.windows} x {args.seq_len} tokens of Pride and Prejudice\n"
    )
    print("| rule | perplexity | vs fp32 | layers | quantize CPU s |")
    print("|---|---|---|---|---|")
    for name, ppl, count, cpu in rows:
        delta = f"{100 * (ppl / base - 1):+.1f}%" if base and name != "fp32" else ""
        print(f"| {name} | {ppl:.3f} | {delta} | {count} | {cpu:.1f} |")


if __name__ == "__main__":
    main()

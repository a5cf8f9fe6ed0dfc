"""mtq.compress on the real SmolLM2-135M-Instruct: weight bytes, perplexity and CPU speed per format.

Per format: resident bytes of the compressed linears' weights vs their fp32 weights, perplexity of
the compressed model vs the fake-quant model (calibrate on *Emma*, evaluate on *Pride and
Prejudice*), greedy-decode tokens/s at batch 1 and prefill tokens/s at batch 8x256, with fp32 and
bf16 rows measured in the same run. Timings on a shared machine are indicative.

    python benchmarks/compress.py [--formats INT4_BLOCK128,INT8,FP8,NVFP4] [--windows 2] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import quant_core as mtq
from quant_core.compress import BACKENDS, CompressedLinear
from quant_llm import create_forward_loop, get_calib_dataloader, perplexity
from quant_llm.testing.real_models import load_smollm2

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FORMATS = {
    "INT4_BLOCK128": mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG,
    "INT8": mtq.INT8_WEIGHT_ONLY_CFG,
    "FP8": mtq.FP8_DEFAULT_CFG,
    "NVFP4": mtq.NVFP4_DEFAULT_CFG,
    "MXFP8": mtq.MXFP8_DEFAULT_CFG,
    "MXFP4": mtq.MXFP4_DEFAULT_CFG,
}


def _best_time(fn, reps: int) -> float:
    """Fastest of ``reps`` runs, in seconds."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(model, tokenizer, reps: int) -> tuple[float, float]:
    """(decode tokens/s at batch 1 over 32 greedy tokens, prefill tokens/s at batch 8x256)."""
    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    ids = torch.randint(0, tokenizer.vocab_size, (8, 256))
    with torch.no_grad():

        def decode() -> None:
            model.generate(
                prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
            )

        def prefill() -> None:
            model(input_ids=ids)

        decode()  # warm-up
        return 32 / _best_time(decode, reps), ids.numel() / _best_time(prefill, reps)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes held by the compressed linears' weight buffers, fp32 bytes of those weights)."""
    packed = fp32 = 0
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            packed += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
            fp32 += m.in_features * m.out_features * 4
    return packed, fp32


def _compressed_layer(cfg: dict, kernels: bool) -> torch.nn.Module:
    """One 576->1536 SmolLM2-sized linear, compressed with its registered kernel or dequantizing."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False))
    mtq.quantize(layer, cfg, forward_loop=lambda m: m(torch.randn(1, 576)))
    saved = dict(BACKENDS)
    if not kernels:
        BACKENDS.clear()
    try:
        return mtq.compress(layer)
    finally:
        BACKENDS.update(saved)


def kernel_table(reps: int) -> None:
    """Per weight format and token count: the raw kernel, dequantize-then-matmul, the backend as
    shipped (kernel up to ``MAX_ROWS`` rows, dequantize above) and the fp32 matmul."""
    print("\n| weight | tokens | kernel ms | dequantize+matmul ms | as shipped ms | fp32 ms |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 1536, bias=False)
    for name in ("INT4_BLOCK128",):
        fast, slow = (_compressed_layer(FORMATS[name], k) for k in (True, False))
        backend = fast[0].backend
        for tokens in (1, 4, 16, 64, 2048):
            x = torch.randn(tokens, 576)
            shipped_rows = backend.MAX_ROWS
            with torch.no_grad():
                backend.MAX_ROWS = 1 << 30  # the raw kernel at every size
                kernel = _best_time(lambda m=fast, x=x: m(x), reps * 5)
                backend.MAX_ROWS = shipped_rows
                t = [_best_time(lambda m=m, x=x: m(x), reps * 5) for m in (slow, fast, dense)]
            print(
                f"| {name} ({backend.name}) | {tokens} | {kernel * 1e3:.3f} | {t[0] * 1e3:.3f} "
                f"| {t[1] * 1e3:.3f} | {t[2] * 1e3:.3f} |",
                flush=True,
            )


def main() -> None:
    """Measure each format and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="INT4_BLOCK128,INT8,FP8,NVFP4")
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument(
        "--kernels-only", action="store_true", help="only the per-layer kernel table"
    )
    args = parser.parse_args()
    kernel_table(args.reps)
    if args.kernels_only:
        return
    torch.manual_seed(0)
    _, tokenizer = load_smollm2()
    calib = get_calib_dataloader(tokenizer, DATA / "austen_emma.txt", 8, 512, 4)
    text = (DATA / "austen_prideprejudice.txt").read_text("utf-8")

    def ppl(model) -> float:
        return perplexity(model, tokenizer, text, seq_len=args.seq_len, num_windows=args.windows)

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_smollm2()
        model.to(dtype)
        rows.append(
            (str(dtype).split(".")[1], None, None, ppl(model), *speed(model, tokenizer, args.reps))
        )
        print(rows[-1], os.getloadavg(), flush=True)
    for name in args.formats.split(","):
        model, _ = load_smollm2()
        config = {**FORMATS[name], "algorithm": "max"}
        mtq.quantize(model, config, create_forward_loop(model, calib))
        fake_ppl = ppl(model)
        mtq.compress(model)
        packed, fp32 = weight_bytes(model)
        backends = sorted(
            {m.backend.name for m in model.modules() if isinstance(m, CompressedLinear)}
        )
        rows.append(
            (
                f"{name} ({'/'.join(backends)})",
                packed / fp32,
                fake_ppl,
                ppl(model),
                *speed(model, tokenizer, args.reps),
            )
        )
        print(rows[-1], os.getloadavg(), flush=True)
        del model

    base_decode, base_prefill = rows[0][4], rows[0][5]
    print(
        f"\nSmolLM2-135M, {args.windows}x{args.seq_len - 1} tokens of Pride and Prejudice; loadavg {os.getloadavg()}"
    )
    print(
        "| model (backend) | weight bytes vs fp32 | ppl fake-quant | ppl compressed | Δ | decode tok/s (vs fp32) | prefill tok/s (vs fp32) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ratio, fake, comp, dec, pre in rows:
        r = (
            "1.00"
            if ratio is None and name == "float32"
            else ("-" if ratio is None else f"{ratio:.3f}")
        )
        f = "-" if fake is None else f"{fake:.4f}"
        d = "-" if fake is None else f"{100 * (comp - fake) / fake:+.3f}%"
        print(
            f"| {name} | {r} | {f} | {comp:.4f} | {d} | {dec:.1f} ({dec / base_decode:.2f}x) | {pre:.0f} ({pre / base_prefill:.2f}x) |"
        )


if __name__ == "__main__":
    main()

"""Throughput of quant_kernels.fake_quantize: format x granularity x dtype x backend on a 4096x4096 tensor.

Prints a markdown table of elements/s and GB/s (bytes read + written, median of several runs).
When nvidia-modelopt imports (``nox -s modelopt -- kernel_throughput.py`` installs it), ModelOpt's
TensorQuantizer is timed on the same tensor in the same run and the ratio ours/theirs printed.
On a CUDA machine the Triton backend is timed too, with the fraction of the bandwidth a plain
device copy of the same tensor reaches.

    python benchmarks/kernel_throughput.py [--size 4096] [--repeats 5] [--dtypes fp32,bf16] [--device cpu]
        [--threads 1 --clock cpu --stat min] [--qat]

On a GPU it also times ModelOpt's Triton NVFP4 kernels and torchao's MX/NVFP4/float8 casts where
they import (`gpu_peers.py`), and with ``--qat`` one QAT step of a Llama-style decoder block
(`qat_step.py`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from gpu_peers import modelopt_extension_status, peers_for

import quant_kernels as qk

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One benchmark row: our fake_quantize arguments and the ModelOpt quantizer config, if it has one."""

    fmt: str
    granularity: str
    kwargs: dict
    static: str | None = None  # "tensor", "channel" or "block": amax computed from x before timing
    modelopt: dict | None = field(default=None)


CASES = [
    Case("INT8", "per-tensor static", {"num_bits": 8}, "tensor", {"num_bits": 8}),
    Case("INT8", "per-tensor dynamic", {"num_bits": 8}, None, {"num_bits": 8}),
    Case("INT8", "per-channel static", {"num_bits": 8}, "channel", {"num_bits": 8, "axis": 0}),
    Case(
        "INT8",
        "per-token dynamic",
        {"num_bits": 8, "block_sizes": {-1: None}},
        None,
        {"num_bits": 8, "block_sizes": {-1: None, "type": "dynamic"}},
    ),
    # ModelOpt computes a missing block amax on the fly; its "type": "dynamic" path needs CUDA
    Case(
        "INT4",
        "block-128 dynamic",
        {"num_bits": 4, "block_sizes": {-1: 128}},
        None,
        {"num_bits": 4, "block_sizes": {-1: 128}},
    ),
    Case(
        "INT4",
        "block-128 static",
        {"num_bits": 4, "block_sizes": {-1: 128}},
        "block",
        {"num_bits": 4, "block_sizes": {-1: 128}},
    ),
    Case("FP8 E4M3", "per-tensor static", {"num_bits": (4, 3)}, "tensor", {"num_bits": (4, 3)}),
    Case("FP8 E4M3", "per-tensor dynamic", {"num_bits": (4, 3)}, None, {"num_bits": (4, 3)}),
    Case(
        "FP8 E4M3",
        "per-channel static",
        {"num_bits": (4, 3)},
        "channel",
        {"num_bits": (4, 3), "axis": 0},
    ),
    Case(
        "FP8 E4M3",
        "per-token dynamic",
        {"num_bits": (4, 3), "block_sizes": {-1: None}},
        None,
        {"num_bits": (4, 3), "block_sizes": {-1: None, "type": "dynamic"}},
    ),
    Case(
        "FP8 E4M3",
        "block-128x128 dynamic",
        {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}},
        None,
        {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}},
    ),
    Case("FP8 E5M2", "per-tensor dynamic", {"num_bits": (5, 2)}, None, {"num_bits": (5, 2)}),
    Case(
        "NVFP4",
        "block-16 dynamic",
        {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)},
        None,
        {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
    ),
    Case(
        "NVFP4",
        "block-16 static",
        {"num_bits": (2, 1), "block_sizes": {-1: 16}, "scale_bits": (4, 3)},
        "block",
    ),
    Case(
        "MXFP8",
        "block-32 dynamic",
        {"num_bits": (4, 3), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
        None,
        {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
    ),
    Case(
        "MXFP6 E3M2",
        "block-32 dynamic",
        {"num_bits": (3, 2), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
        None,
        {"num_bits": (3, 2), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
    ),
    Case(
        "MXFP4",
        "block-32 dynamic",
        {"num_bits": (2, 1), "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
        None,
        {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
    ),
    Case(
        "MXINT8",
        "block-32 dynamic",
        {"num_bits": 8, "block_sizes": {-1: 32}, "scale_bits": (8, 0)},
        None,
        {"num_bits": 8, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}},
    ),
]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


STATS = {"median": statistics.median, "min": min}


def median_seconds(
    fns: list[Callable[[], object]],
    repeats: int,
    sync: Callable[[], None],
    clock: Callable[[], float] = time.perf_counter,
    stat: Callable[[list[float]], float] = statistics.median,
) -> list[float]:
    """Median (or ``stat``) time (by ``clock``) of each function, run in turn ``repeats`` times
    after one warm-up each, so that a load change on a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    sync()
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = clock()
            fn()
            sync()
            record.append(clock() - start)
    return [stat(t) for t in times]


def static_amax(x: torch.Tensor, case: Case) -> dict:
    """The amax arguments of a static case, computed from x (outside the timed region)."""
    if case.static is None:
        return {}
    if case.static == "tensor":
        return {"amax": qk.reduce_amax(x)}
    if case.static == "channel":
        return {"amax": qk.reduce_amax(x, axis=0)}
    amax = qk.reduce_amax(x, block_sizes=case.kwargs["block_sizes"])
    out = {"amax": amax}
    if case.kwargs.get("scale_bits") == (4, 3):
        out["global_amax"] = amax.max()
    return out


def modelopt_quantizer(case: Case, x: torch.Tensor, amax: dict):
    """ModelOpt's TensorQuantizer for the case, or (None, reason)."""
    if case.modelopt is None:
        return None, "not timed"
    try:
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError:
        return None, "not installed"
    try:
        quantizer = TensorQuantizer(QuantizerAttributeConfig(**case.modelopt)).to(x.device)
        if "amax" in amax:
            a = amax["amax"]
            quantizer.amax = a.reshape(-1, 1) if case.static == "block" else a
        with torch.no_grad():
            quantizer(x)
    except Exception as err:  # ModelOpt's NVFP4/MX paths need its CUDA extension
        return None, f"fails on {x.device.type} ({type(err).__name__})"
    return quantizer, ""


def run(
    size: int,
    repeats: int,
    dtypes: list[str],
    device: str,
    clock: Callable[[], float],
    stat: Callable[[list[float]], float] = statistics.median,
) -> list[dict]:
    """Time every case; returns one dict per table row."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fns: list[Callable[[], object]]) -> list[float]:
        return median_seconds(fns, repeats, sync, clock, stat)

    backends = ["reference"]
    if device == "cuda" and "triton" in qk.available_backends():
        backends.append("triton")
    rows = []
    torch.manual_seed(0)
    base = torch.randn(size, size, device=device)
    for dname in dtypes:
        x = base.to(DTYPES[dname])
        moved = 2 * x.numel() * x.element_size()  # bytes read + written
        (copy_s,) = timed([lambda x=x: x.clone()])
        copy_gbs = moved / copy_s / 1e9
        rows.append(
            _row("(copy)", "x.clone()", dname, "torch", x.numel() / copy_s, copy_gbs, copy_gbs)
        )
        print(_row_text(rows[-1]), flush=True)
        for case in CASES:
            amax = static_amax(x, case)
            quantizer, why = modelopt_quantizer(case, x, amax)
            fns = [
                lambda kw={**case.kwargs, **amax, "backend": b}, x=x: qk.fake_quantize(x, **kw)
                for b in backends
            ]
            if quantizer is not None:
                fns.append(lambda q=quantizer, x=x: q(x))
            with torch.no_grad():
                times = timed(fns)
                same = ""
                if quantizer is not None:
                    # same grid point: equal up to the last bit (ModelOpt multiplies by qmax/amax
                    # and divides by it where we divide by amax/qmax and multiply)
                    ulp = 2 * torch.finfo(x.dtype).eps
                    ours_y, theirs_y = qk.fake_quantize(x, **case.kwargs, **amax), quantizer(x)
                    close = torch.isclose(ours_y, theirs_y, rtol=ulp, atol=0)
                    same = f"{100 * close.float().mean().item():.2f}%"
            for backend, ours in zip(backends, times):
                row = _row(
                    case.fmt,
                    case.granularity,
                    dname,
                    backend,
                    x.numel() / ours,
                    moved / ours / 1e9,
                    copy_gbs,
                    why,
                )
                if quantizer is not None:
                    theirs = times[-1]
                    row.update(
                        modelopt=f"{x.numel() / theirs / 1e6:.1f}",
                        ratio=f"{theirs / ours:.2f}x",
                        same=same,
                    )
                rows.append(row)
                print(_row_text(row), flush=True)
            if device == "cuda":
                rows += _peer_rows(case, x, amax, timed, times[len(backends) - 1], copy_gbs, dname)
    return rows


def _peer_rows(case, x, amax, timed, ours_s, copy_gbs, dname) -> list[dict]:
    """Rows for ModelOpt's Triton NVFP4 kernels and torchao's casts on this case (`gpu_peers`):
    their speed, ours (last backend, Triton on a GPU) over theirs, and agreement within 1 ulp."""
    rows = []
    moved = 2 * x.numel() * x.element_size()
    for name, call in peers_for(case.fmt, case.granularity, x, amax):
        if isinstance(call, str):
            row = _row(case.fmt, case.granularity, dname, name, 0.0, 0.0, copy_gbs, call)
        else:
            with torch.no_grad():
                (theirs,) = timed([call])
                ulp = 2 * torch.finfo(x.dtype).eps
                ours_y = qk.fake_quantize(x, **case.kwargs, **amax)
                close = torch.isclose(ours_y, call(), rtol=ulp, atol=0)
            row = _row(
                case.fmt,
                case.granularity,
                dname,
                name,
                x.numel() / theirs,
                moved / theirs / 1e9,
                copy_gbs,
            )
            row.update(
                ratio=f"{theirs / ours_s:.2f}x", same=f"{100 * close.float().mean().item():.2f}%"
            )
        rows.append(row)
        print(_row_text(row), flush=True)
    return rows


def _row(fmt, granularity, dtype, backend, elems, gbs, copy_gbs, modelopt="") -> dict:
    return {
        "format": fmt,
        "granularity": granularity,
        "dtype": dtype,
        "backend": backend,
        "elems": elems,
        "gbs": gbs,
        "copy_gbs": copy_gbs,
        "modelopt": modelopt,
        "ratio": "",
        "same": "",
    }


HEADER = (
    "| format | granularity | dtype | backend | Melem/s | GB/s | % of copy "
    "| ModelOpt Melem/s | ours/ModelOpt | same as ModelOpt (1 ulp) |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|"
)


def _row_text(r: dict) -> str:
    return (
        f"| {r['format']} | {r['granularity']} | {r['dtype']} | {r['backend']} "
        f"| {r['elems'] / 1e6:.1f} | {r['gbs']:.2f} | {100 * r['gbs'] / r['copy_gbs']:.0f}% "
        f"| {r['modelopt']} | {r['ratio']} | {r['same']} |"
    )


def export_parity() -> list[str]:
    """Compare our codes and scales with ModelOpt's NVFP4/MXFP4/MXFP8 packers (pure torch, so they
    run on CPU): share of identical code nibbles/bytes and of identical scales."""
    try:
        from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor, NVFP4QTensor
    except ImportError:
        return []
    lines = [
        "| format | dtype | same codes | same block scales | same global scale |",
        "|---|---|---:|---:|---:|",
    ]
    torch.manual_seed(1)
    base = torch.randn(256, 512) * torch.logspace(-2, 2, 256).view(256, 1)

    def share(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{100 * (a.reshape(-1) == b.reshape(-1)).float().mean().item():.2f}%"

    for dname in ("fp32", "bf16"):
        x = base.to(DTYPES[dname])
        qt, scale, gscale = NVFP4QTensor.quantize(x, 16)
        ours = qk.quantize_to_codes(x, (2, 1), block_sizes={-1: 16}, scale_bits=(4, 3))
        lines.append(
            f"| NVFP4 | {dname} | {share(qk.unpack_fp4(qt._quantized_data.view(torch.uint8)), ours.codes)} "
            f"| {share(scale.view(torch.uint8), ours.scale.view(torch.uint8))} "
            f"| {'yes' if gscale.item() == ours.global_scale.item() else 'no'} |"
        )
        qt, scale = MXFP4QTensor.quantize(x, 32)
        ours = qk.quantize_to_codes(x, (2, 1), block_sizes={-1: 32}, scale_bits=(8, 0))
        lines.append(
            f"| MXFP4 | {dname} | {share(qk.unpack_fp4(qt._quantized_data.view(torch.uint8)), ours.codes)} "
            f"| {share(scale, ours.scale.view(torch.uint8))} | |"
        )
        qt, scale = MXFP8QTensor.quantize(x)
        ours = qk.quantize_to_codes(x, (4, 3), block_sizes={-1: 32}, scale_bits=(8, 0))
        lines.append(
            f"| MXFP8 | {dname} | {share(qt._quantized_data.view(torch.uint8), ours.codes.view(torch.uint8))} "
            f"| {share(scale, ours.scale.view(torch.uint8))} | |"
        )
    return lines


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--stat", choices=list(STATS), default="median", help="summary of the repeats"
    )
    parser.add_argument(
        "--qat",
        action="store_true",
        help="also time a QAT step of a Llama-style block (qat_step.py)",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {args.size}x{args.size} on {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.clock} clock, {args.stat} of {args.repeats}"
    )
    if args.device == "cuda":
        print(
            f"# {torch.cuda.get_device_name()}; ModelOpt CUDA extensions: {modelopt_extension_status()}"
        )
    print(HEADER, flush=True)
    rows = run(
        args.size,
        args.repeats,
        args.dtypes.split(","),
        args.device,
        CLOCKS[args.clock],
        STATS[args.stat],
    )
    print("\nfull table:\n" + HEADER)
    for r in rows:
        print(_row_text(r))
    if args.qat:
        import qat_step

        print("\nQAT step of a Llama-style decoder block (forward + backward):")
        qat_args = (
            qat_step.parse_args([])
            if args.device == "cuda"
            else qat_step.parse_args(
                [
                    "--hidden",
                    "256",
                    "--ffn",
                    "512",
                    "--heads",
                    "4",
                    "--kv-heads",
                    "2",
                    "--seq",
                    "64",
                ]
            )
        )
        print("\n".join(qat_step.run(qat_args)))
    parity = export_parity()
    if parity:
        print("\nexport codes and scales vs ModelOpt's NVFP4/MX packers (256x512, CPU):")
        print("\n".join(parity))


if __name__ == "__main__":
    main()

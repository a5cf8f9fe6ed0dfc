"""One QAT step (forward + backward) of a Llama-style decoder block, quantized vs unquantized.

The block is Llama's shape (RMSNorm, grouped-query attention through SDPA, SwiGLU MLP, all
projections `nn.Linear` without bias), built here so that the step times only the block. It is
quantized with `quant_core.quantize` (W4A8: INT4 block-128 weights + FP8 per-tensor activations,
`W4A8_AWQ_BETA_CFG`'s quantizers with `max` calibration; NVFP4: `NVFP4_DEFAULT_CFG`), calibrated
on one batch, and timed against the same block unquantized: that difference is what QAT pays.

    python benchmarks/qat_step.py [--hidden 4096 --ffn 14336 --heads 32 --kv-heads 8
                                   --batch 4 --seq 2048 --dtype bf16 --repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import quant_core as mtq

CONFIGS = {
    "unquantized": None,
    "W4A8 (INT4 block-128 weights, FP8 activations)": {
        **mtq.W4A8_AWQ_BETA_CFG,
        "algorithm": "max",
    },
    "NVFP4 (weights and activations)": mtq.NVFP4_DEFAULT_CFG,
}


class RMSNorm(nn.Module):
    """Llama's RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class DecoderBlock(nn.Module):
    """Pre-norm attention (GQA, causal SDPA, no rotary: it costs the same either way) + SwiGLU MLP."""

    def __init__(self, hidden: int, ffn: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.input_layernorm = RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, s, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def step_seconds(block: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of forward + backward (device-synchronised around each step)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(repeats + 2):  # two warm-up steps (kernel compilation)
        block.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        block(x).float().pow(2).mean().backward()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[str]:
    """Time every config; returns markdown table lines."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    base = DecoderBlock(args.hidden, args.ffn, args.heads, args.kv_heads).to(args.device, dtype)
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device, dtype=dtype)
    lines = [
        f"| config | step ms ({args.batch}x{args.seq}, hidden {args.hidden}, {args.dtype}) "
        "| overhead vs unquantized |",
        "|---|---:|---:|",
    ]
    plain = None
    for name, config in CONFIGS.items():
        block = copy.deepcopy(base)
        if config is not None:
            with torch.no_grad():
                mtq.quantize(block, copy.deepcopy(config), lambda m: m(x))
        seconds = step_seconds(block, x.detach().requires_grad_(), args.repeats)
        plain = plain or seconds
        lines.append(f"| {name} | {1e3 * seconds:.1f} | {100 * (seconds / plain - 1):+.0f}% |")
        print(lines[-1], flush=True)
        del block
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (``argv`` None: sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main() -> None:
    """Parse arguments, time, print the table."""
    print("\n".join(run(parse_args())))


if __name__ == "__main__":
    main()

"""Other libraries' fake-quantization calls timed beside ours on a GPU (for `kernel_throughput.py`).

ModelOpt: its CUDA extension (`modelopt.torch.quantization.extensions`: fake_tensor_quant,
fake_e4m3fy, the MX fused_amax_convert; built on first use, so the GPU machine needs nvcc) is what
its `TensorQuantizer` runs on CUDA, which `kernel_throughput.py` times already; this module adds its Triton
NVFP4 kernels (`modelopt.torch.kernels.quantization.gemm`: `fp4_fake_quant_block` for dynamic
blocks, `static_blockwise_fp4_fake_quant` for calibrated ones). torchao: its MX and NVFP4 casts
(`MXTensor.to_mx(...).dequantize()`, RCEIL scales = 2**ceil(log2(amax / max)) as ours;
`NVFP4Tensor.to_nvfp4(...).dequantize()`) and its float8 per-tensor dynamic cast
(`hp_tensor_to_float8_dynamic(...).to_original_precision()`). Each returns a fake-quantized tensor
in x's dtype, so the time and the agreement with ours compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Peer = Callable[[torch.Tensor, dict], torch.Tensor]


def modelopt_extension_status() -> str:
    """Which of ModelOpt's CUDA extensions load here (they compile on first use)."""
    try:
        from modelopt.torch.quantization import extensions
    except ImportError as err:
        return f"modelopt not importable ({err})"
    parts = []
    for name in ("get_cuda_ext", "get_cuda_ext_fp8", "get_cuda_ext_mx"):
        try:
            ok = getattr(extensions, name)(raise_if_failed=False) is not None
        except Exception as err:  # a failed build raises on some versions
            ok, name = False, f"{name} ({type(err).__name__})"
        parts.append(f"{name}: {'loaded' if ok else 'not built'}")
    return ", ".join(parts)


def _modelopt_fp4_dynamic(x: torch.Tensor, amax: dict) -> torch.Tensor:
    from modelopt.torch.kernels.quantization.gemm import fp4_fake_quant_block

    return fp4_fake_quant_block(x, x.detach().abs().amax().float())  # its global amax included


def _modelopt_fp4_static(x: torch.Tensor, amax: dict) -> torch.Tensor:
    from modelopt.torch.kernels.quantization.gemm import static_blockwise_fp4_fake_quant

    return static_blockwise_fp4_fake_quant(x, amax["amax"], amax["global_amax"])


def _torchao_mx(elem: str) -> Peer:
    def run(x: torch.Tensor, amax: dict) -> torch.Tensor:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        dtype = getattr(torch, elem, elem)
        mx = MXTensor.to_mx(x, dtype, 32, scaling_mode=ScaleCalculationMode.RCEIL)
        return mx.dequantize(x.dtype)

    return run


def _torchao_nvfp4(x: torch.Tensor, amax: dict) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    scale = per_tensor_amax_to_scale(x.detach().abs().amax().float())
    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(x.dtype)


def _torchao_fp8_tensor(x: torch.Tensor, amax: dict) -> torch.Tensor:
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    fp8 = hp_tensor_to_float8_dynamic(x, torch.float8_e4m3fn, LinearMMConfig())
    return fp8.to_original_precision()


# (format, granularity) of a kernel_throughput.py case -> [(column name, call)]
PEERS: dict[tuple[str, str], list[tuple[str, Peer]]] = {
    ("NVFP4", "block-16 dynamic"): [
        ("ModelOpt Triton fp4_fake_quant_block", _modelopt_fp4_dynamic),
        ("torchao NVFP4Tensor", _torchao_nvfp4),
    ],
    ("NVFP4", "block-16 static"): [
        ("ModelOpt Triton static_blockwise_fp4_fake_quant", _modelopt_fp4_static),
    ],
    ("FP8 E4M3", "per-tensor dynamic"): [("torchao float8 tensorwise", _torchao_fp8_tensor)],
    ("MXFP8", "block-32 dynamic"): [("torchao MXTensor", _torchao_mx("float8_e4m3fn"))],
    ("MXFP6 E3M2", "block-32 dynamic"): [("torchao MXTensor", _torchao_mx("fp6_e3m2"))],
    ("MXFP4", "block-32 dynamic"): [("torchao MXTensor", _torchao_mx("float4_e2m1fn_x2"))],
}


def peers_for(
    fmt: str, granularity: str, x: torch.Tensor, amax: dict
) -> list[tuple[str, Callable]]:
    """The peers of one case that run on ``x``: ``[(name, zero-argument call)]``, or a reason in
    place of the call (a string) when one fails (missing library, unsupported dtype or device)."""
    out: list[tuple[str, Callable | str]] = []
    for name, peer in PEERS.get((fmt, granularity), []):
        try:
            with torch.no_grad():
                peer(x, amax)
        except Exception as err:
            out.append((name, f"fails ({type(err).__name__}: {str(err)[:60]})"))
            continue
        out.append((name, lambda peer=peer: peer(x, amax)))
    return out

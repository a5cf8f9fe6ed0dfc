"""Side by side with ModelOpt 0.47 on the same tensors (CPU): ``pass_through_bwd`` gradients, NVFP4
"four over six" weights, and ``lsq`` training. Prints one table; needs nvidia-modelopt
(``nox -s modelopt -- modelopt_parity.py``) and says so without it.

ModelOpt's static NVFP4 fake quantization is a Triton kernel for CUDA only; here its launch is
replaced by the same arithmetic in PyTorch (ModelOpt's ``compute_fp4_scales`` for the block
scales, its E2M1 rounding thresholds from ``kernels/quantization/common/nvfp4_quant.py``), while
calibration, the MSE search, the global amax and LSQ are ModelOpt's own code.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys

import torch
from torch import nn


def _e2m1_round(a: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``fp4_round_magnitude`` thresholds, in PyTorch."""
    out = torch.full_like(a, 6.0)
    for bound, value, inclusive in (
        (5.0, 4.0, True),
        (3.5, 3.0, False),
        (2.5, 2.0, True),
        (1.75, 1.5, False),
        (1.25, 1.0, True),
        (0.75, 0.5, False),
        (0.25, 0.0, True),
    ):
        out = torch.where(a <= bound if inclusive else a < bound, value, out)
    return out


def _patch_modelopt_static_nvfp4() -> None:
    import modelopt.torch.kernels.quantization.gemm as tk
    from modelopt.torch.kernels.quantization.gemm import fp4_kernel

    def fake_quant(
        x, amax, global_amax=None, quantize_block_scales=True, fp8_max=448.0, out_dtype=None
    ):
        scale = fp4_kernel.compute_fp4_scales(amax, global_amax, quantize_block_scales, fp8_max)
        xb = x.float().reshape(-1, x.numel() // amax.numel())
        s = scale.float().reshape(-1, 1)
        safe = torch.where(s == 0, 1.0, s)
        q = _e2m1_round(xb.abs() / safe) * safe
        y = torch.where(s == 0, 0.0, torch.where(xb >= 0, q, -q))
        return y.reshape(x.shape).to(out_dtype or x.dtype)

    def cast(x, out_dtype=None):
        q = _e2m1_round(x.float().abs())
        return torch.where(x >= 0, q, -q).to(out_dtype or x.dtype)

    tk.static_blockwise_fp4_fake_quant = fake_quant
    tk.static_blockwise_fp4_cast = cast
    tk.IS_AVAILABLE = True
    torch.cuda.device = lambda _d: contextlib.nullcontext()  # the launch's device guard


def _gradient_rows() -> list[tuple[str, str]]:
    import modelopt.torch.quantization.nn as mnn
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    from quant_core.nn import TensorQuantizer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * 3
    upstream = torch.randn(64, 256, generator=gen)
    amax = x.abs().amax(1, keepdim=True) * 0.6
    rows = []
    for pass_through in (True, False):
        grads = []
        for q in (
            mnn.TensorQuantizer(
                QuantizerAttributeConfig(num_bits=8, axis=0, pass_through_bwd=pass_through),
                amax=amax,
            ),
            TensorQuantizer(
                {"num_bits": 8, "axis": 0, "pass_through_bwd": pass_through}, amax=amax
            ),
        ):
            xg = x.clone().requires_grad_()
            q(xg).backward(upstream)
            grads.append(xg.grad)
        same = (grads[0] == grads[1]).float().mean().item()
        rows.append(
            (f"INT8 per-channel gradient, pass_through_bwd={pass_through}", f"{same:.4%} equal")
        )
    return rows


def _four_over_six_rows() -> list[tuple[str, str]]:
    import modelopt.torch.quantization as mo

    import quant_core as mtq
    from quant_kernels.plan import make_plan
    from quant_kernels.reference import block_scales, view_scales

    torch.manual_seed(0)
    layer = nn.Linear(512, 256)
    data = [torch.randn(8, 512) for _ in range(2)]
    cfg = copy.deepcopy(mo.NVFP4_FOUR_OVER_SIX_CFG)
    theirs = mo.quantize(copy.deepcopy(layer), cfg, lambda m: [m(d) for d in data])
    ours = mtq.quantize(
        copy.deepcopy(layer), mtq.NVFP4_FOUR_OVER_SIX_CFG, lambda m: [m(d) for d in data]
    )
    w = layer.weight.detach()
    with torch.no_grad():
        w_theirs, w_ours = theirs.weight_quantizer(w), ours.weight_quantizer(w)
    # ModelOpt stores the choice in the block amax (1.5 x max |w| for M=4); quant picks in the kernel
    block_max = w.reshape(-1, 16).abs().amax(-1)
    theirs_four = theirs.weight_quantizer._amax.flatten() > block_max
    plan = make_plan(
        w,
        (2, 1),
        ours.weight_quantizer.amax,
        {-1: 16, "four_over_six": True},
        (4, 3),
        None,
        False,
        False,
    )
    xv = plan.layout.to_view(w.reshape(plan.layout.shape))
    chosen = view_scales(xv, plan.amax, plan)[0]
    four = block_scales(plan.amax * 1.5, plan, plan.global_amax)[0]
    ours_four = (chosen == four).flatten()
    rel = ((w_theirs - w_ours).abs() / w_ours.abs().clamp(min=1e-30)).max().item()
    return [
        (
            "NVFP4 4/6 (512x256 weight): blocks ModelOpt scales to 4",
            f"{theirs_four.float().mean():.2%}",
        ),
        (
            "NVFP4 4/6: same M=4/M=6 choice per block",
            f"{(theirs_four == ours_four).float().mean():.2%}",
        ),
        ("NVFP4 4/6: weights bit-equal", f"{(w_theirs == w_ours).float().mean():.2%}"),
        ("NVFP4 4/6: largest relative difference of a weight", f"{rel:.2e}"),
    ]


_LSQ_FORMATS = {
    "NVFP4": {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3)}},
    "INT4": {"num_bits": 4, "block_sizes": {-1: 16, "type": "static"}},
}
_LSQ_SETTINGS = {
    "dual": {"learnable_amax": ["pre", "post"]},
    "tied": {"learnable_amax": ["pre", "post"], "tied_amax": True},
    "post only": {"learnable_amax": "post"},
    "dual, pre unrounded": {"learnable_amax": ["pre", "post"], "quantize_pre_scale": False},
}


def _lsq_outputs(quantize, cfg: dict, layer: nn.Module, x: torch.Tensor) -> tuple:
    """The LSQ weight output and every learned amax's gradient, post amax moved off the start."""
    model = quantize(copy.deepcopy(layer), cfg, lambda m: m(x))
    q, w = model.weight_quantizer, layer.weight.detach()
    with torch.no_grad():
        q.amax_post.mul_(0.93)
    y = q(w)
    y.backward(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), [p.grad.flatten() for _, p in sorted(q.named_parameters())]


def _lsq_rows() -> list[tuple[str, str]]:
    import modelopt.torch.quantization as mo

    import quant_core as mtq

    rows = []
    for fmt, weight in _LSQ_FORMATS.items():
        for setting, options in _LSQ_SETTINGS.items():
            torch.manual_seed(0)
            layer, x = nn.Linear(256, 64), torch.randn(8, 256)
            algorithm = {"method": "lsq", "scale_algorithm": {"method": "max"}, **options}
            theirs_cfg = {
                "quant_cfg": [
                    {"quantizer_name": "*", "enable": False},
                    {"quantizer_name": "*weight_quantizer", "cfg": weight},
                ],
                "algorithm": algorithm,
            }
            ours_cfg = {
                "quant_cfg": {"*weight_quantizer": weight, "*input_quantizer": {"enable": False}},
                "algorithm": algorithm,
            }
            y0, grads0 = _lsq_outputs(mo.quantize, theirs_cfg, layer, x)
            y1, grads1 = _lsq_outputs(mtq.quantize, ours_cfg, layer, x)
            rel = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(grads0, grads1))
            rows.append(
                (
                    f"LSQ {fmt} ({setting}), 256x64: outputs equal / largest amax-gradient difference",
                    f"{(y0 == y1).float().mean():.2%} / {rel:.2e}",
                )
            )
    return rows


def main() -> None:
    if importlib.util.find_spec("modelopt") is None:
        print("nvidia-modelopt is not installed: run `nox -s modelopt -- modelopt_parity.py`")
        return
    _patch_modelopt_static_nvfp4()
    rows = _gradient_rows() + _four_over_six_rows() + _lsq_rows()
    print("| check | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    sys.exit(main())

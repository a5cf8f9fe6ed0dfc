"""On a CUDA device, every built-in config and algorithm calibrates a tiny Llama like it does on CPU.

The CPU path is checked against float64 references elsewhere; here the same model and data are
calibrated on both devices and the CUDA result must live on the GPU, agree with the CPU one, and
lose no more accuracy than it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from core_models import make_tiny_llama

import quant_core as mtq
from quant_core.conversion import iter_quantizers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KV_ONLY = {"FP8_KV_CFG", "FP8_AFFINE_KV_CFG", "NVFP4_KV_CFG", "NVFP4_AFFINE_KV_CFG"}
INT4 = mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG
ALGORITHM_VARIANTS = {
    "INT4+gptq": (INT4, "gptq"),
    "INT4+awq_full": (INT4, "awq_full"),
    "INT4+awq_clip": (INT4, "awq_clip"),
    "INT4+mse": (INT4, "mse"),
    "W4A16_NVFP4+mse": (mtq.W4A16_NVFP4_CFG, "mse"),
    "INT8+smoothquant": (mtq.INT8_DEFAULT_CFG, "smoothquant"),
}
CONFIGS = {name: getattr(mtq, name) for name in sorted(mtq.choices) if name not in KV_ONLY}
CONFIGS.update(
    {name: {**cfg, "algorithm": algo} for name, (cfg, algo) in ALGORITHM_VARIANTS.items()}
)


def _calibrated(config: dict, device: str, batches: list[torch.Tensor]) -> torch.nn.Module:
    model = make_tiny_llama().to(device)
    data = [b.to(device) for b in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtq.quantize(model, copy.deepcopy(config), lambda m: [m(ids) for ids in data])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.double().cpu()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_calibration_matches_cpu(name):
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(4)]
    held_out = torch.randint(0, 256, (2, 32), generator=gen)
    reference = _logits(make_tiny_llama(), held_out)

    on_cpu = _calibrated(CONFIGS[name], "cpu", batches)
    on_cuda = _calibrated(CONFIGS[name], "cuda", batches)

    cpu_quantizers = {n: q for n, q, _ in iter_quantizers(on_cpu)}
    for qname, quantizer, _ in iter_quantizers(on_cuda):
        for bname, buffer in quantizer.named_buffers():
            assert buffer.device.type == "cuda", f"{qname}.{bname} stayed on {buffer.device}"
        amax, cpu_amax = quantizer.amax, cpu_quantizers[qname].amax
        assert (amax is None) == (cpu_amax is None), qname
        if amax is not None:
            torch.testing.assert_close(amax.cpu(), cpu_amax, rtol=2e-2, atol=1e-6, msg=qname)

    cuda_out, cpu_out = _logits(on_cuda, held_out), _logits(on_cpu, held_out)
    assert torch.isfinite(cuda_out).all()
    cuda_error = (cuda_out - reference).norm() / reference.norm()
    cpu_error = (cpu_out - reference).norm() / reference.norm()
    assert cuda_error <= 1.25 * cpu_error + 1e-4, (float(cuda_error), float(cpu_error))
    assert (cuda_out - cpu_out).norm() / reference.norm() <= 0.5 * cpu_error + 1e-4

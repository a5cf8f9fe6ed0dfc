"""Which inference engines load which ModelOpt-layout checkpoints, read from their loaders' source.

* vLLM: ``vllm/model_executor/layers/quantization/modelopt.py`` (``QUANT_ALGOS``,
  ``KV_CACHE_QUANT_ALGOS``): FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8
  and MIXED_PRECISION of those; FP8 and NVFP4 KV caches. No INT4 / INT8 path, and no
  ``pre_quant_scale`` on any linear.
* SGLang: ``python/sglang/srt/layers/quantization/modelopt_quant.py`` (``ModelOptFp8Config``,
  ``ModelOptFp4Config``): FP8 and NVFP4, the latter also weight-only (W4A16_NVFP4, no
  ``input_scale``); FP8 KV cache.
* TensorRT-LLM (PyTorch backend): ``tensorrt_llm/_torch/modules/linear.py`` (one
  ``LinearMethod`` per ``QuantAlgo``): FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4, W4A16_AWQ, W4A8_AWQ,
  W8A16, W4A8_NVFP4_FP8, MIXED_PRECISION; its W4A16_AWQ loader reads ``pre_quant_scale`` on every
  unfused layer (o_proj, down_proj) and never on fused q/k/v or gate/up; FP8, NVFP4 and INT8 KV.
  It has no SmoothQuant linear. Its FP8 KV cache runs with scales of 1.0: the exported ``k_scale``
  / ``v_scale`` are not read (a :data:`KV_CAVEATS` entry, which :func:`loaders_for` warns about).

A format no engine loads (W8A8 SmoothQuant, NVFP4 with an unfolded pre-quant scale) is refused by
the ModelOpt-layout exporter; the compressed-tensors layout holds W8A8.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from quant_core.diagnostics import QuantWarning
from quant_export.quantizers import UnsupportedFormatError


@dataclass(frozen=True)
class Loader:
    """The ModelOpt-layout formats one engine's loader takes."""

    name: str
    quant_algos: frozenset[str]
    kv_algos: frozenset[str]
    source: str
    mixed: bool = True  # takes MIXED_PRECISION (per-layer formats)

    def takes(self, algos: set[str], kv_algo: str | None) -> bool:
        """True when every layer format in ``algos`` and the KV-cache format are loadable."""
        return (
            algos <= self.quant_algos
            and (self.mixed or len(algos) <= 1)
            and (kv_algo is None or kv_algo in self.kv_algos)
        )

    def describe(self) -> str:
        """One line: the engine, its formats and KV formats."""
        return (
            f"{self.name} takes {', '.join(sorted(self.quant_algos))} "
            f"(KV cache {', '.join(sorted(self.kv_algos))})"
        )


LOADERS: dict[str, Loader] = {
    "vllm": Loader(
        "vLLM",
        frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4"}),
        frozenset({"FP8", "NVFP4"}),
        "vllm/model_executor/layers/quantization/modelopt.py",
    ),
    "sglang": Loader(
        "SGLang",
        frozenset({"FP8", "NVFP4", "W4A16_NVFP4"}),
        frozenset({"FP8"}),
        "python/sglang/srt/layers/quantization/modelopt_quant.py",
        mixed=False,
    ),
    "tensorrt_llm": Loader(
        "TensorRT-LLM",
        frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_AWQ", "W8A16"}),
        frozenset({"FP8", "NVFP4", "INT8"}),
        "tensorrt_llm/_torch/modules/linear.py",
    ),
}


# (engine, KV-cache format) -> what that engine does differently from what the checkpoint says
KV_CAVEATS: dict[tuple[str, str], str] = {
    ("tensorrt_llm", "FP8"): (
        "TensorRT-LLM's PyTorch backend runs an FP8 KV cache with scales of 1.0 and ignores the "
        "exported k_scale / v_scale (its TensorRT engine path, from a trtllm checkpoint, reads them)"
    ),
}


def loaders_for(algos: set[str], kv_algo: str | None, engine: str | None = None) -> list[str]:
    """Names of the engines that load a checkpoint with layer formats ``algos``; raises if none.

    With ``engine`` (a key of :data:`LOADERS`), only that engine counts.
    """
    if engine is not None and engine not in LOADERS:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(LOADERS)}")
    candidates = {engine: LOADERS[engine]} if engine else LOADERS
    able = [key for key, loader in candidates.items() if loader.takes(algos, kv_algo)]
    if not able:
        what = ", ".join(sorted(algos)) + (f" with a {kv_algo} KV cache" if kv_algo else "")
        reasons = "; ".join(loader.describe() for loader in candidates.values())
        raise UnsupportedFormatError(
            f"no engine loads {what} from the ModelOpt layout ({reasons}); choose another format "
            "or the compressed-tensors layout"
        )
    for key in able:
        caveat = KV_CAVEATS.get((key, kv_algo or ""))
        if caveat:
            warnings.warn(caveat, QuantWarning, stacklevel=2)
    return able

"""The built-in configs, with the same quantizer attributes as ModelOpt's configs of the same name.

Each is a read-only dict (see :mod:`quant_core.config.frozen`): ``cfg.copy()`` gives an editable
deep copy. ``quant_cfg`` is ModelOpt 0.47's ordered entry list that also takes the classic
``quant_cfg[pattern] = attributes`` edit (see :mod:`quant_core.config.entry_list`). Every config ends with the default-disabled patterns (LM heads, MoE routers and gates,
embeddings, BatchNorm, output layers, vision towers). Configs with ``"algorithm": "max"`` and static
per-tensor inputs (INT8_DEFAULT_CFG, FP8_DEFAULT_CFG, ...) get max's per-token fallback: inputs whose
calibration tokens defeat one per-tensor amax become per-token dynamic (see
:mod:`quant_core.algorithms.per_token_fallback`).
"""

from __future__ import annotations

from typing import Any

from quant_core.config.entry_list import QuantCfgList
from quant_core.config.frozen import freeze
from quant_core.config.helpers import entry_dicts

_default_disabled_quantizer_cfg: dict[str, Any] = {
    "nn.BatchNorm1d": {"*": {"enable": False}},
    "nn.BatchNorm2d": {"*": {"enable": False}},
    "nn.BatchNorm3d": {"*": {"enable": False}},
    "nn.LeakyReLU": {"*": {"enable": False}},
    "nn.Embedding": {"*": {"enable": False}},
    "*lm_head*": {"enable": False},
    "*proj_out.*": {"enable": False},  # Whisper's LM head
    "*block_sparse_moe.gate*": {"enable": False},  # MoE routers
    "*router*": {"enable": False},
    "*mlp.gate.*": {"enable": False},
    "*mlp.shared_expert_gate.*": {"enable": False},
    "*output_layer*": {"enable": False},
    "output.*": {"enable": False},
    "*embed_vision*": {"enable": False},  # vision towers and multimodal projectors
    "*vision_tower*": {"enable": False},
    "*visual*": {"enable": False},
    "*vision_model*": {"enable": False},
    "*multi_modal_projector*": {"enable": False},
    "default": {"enable": False},
}

_INT8_W = {"num_bits": 8, "axis": 0}
_INT8_A = {"num_bits": 8, "axis": None}
_FP8 = {"num_bits": (4, 3), "axis": None}
_INT4_BLOCK = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}, "enable": True}
_NVFP4 = {
    "num_bits": (2, 1),
    "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
    "axis": None,
    "enable": True,
}
_OFF = {"enable": False}


def _mx(num_bits: int | tuple[int, int]) -> dict[str, Any]:
    return {
        "num_bits": num_bits,
        "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)},
        "enable": True,
    }


def _entries(quant_cfg: dict[str, Any]) -> QuantCfgList:
    return QuantCfgList(entry_dicts(quant_cfg))


def _cfg(weight: Any, inp: Any, algorithm: Any) -> dict[str, Any]:
    return freeze(
        {
            "quant_cfg": _entries(
                {
                    "*weight_quantizer": weight,
                    "*input_quantizer": inp,
                    **_default_disabled_quantizer_cfg,
                }
            ),
            "algorithm": algorithm,
        }
    )


def _kv(attrs: dict[str, Any]) -> dict[str, Any]:
    return freeze(
        {
            "quant_cfg": _entries({"*[kv]_bmm_quantizer": attrs, "default": {"enable": False}}),
            "algorithm": "max",
        }
    )


INT8_DEFAULT_CFG = _cfg(_INT8_W, _INT8_A, "max")
INT8_SMOOTHQUANT_CFG = _cfg(_INT8_W, _INT8_A, "smoothquant")
INT8_WEIGHT_ONLY_CFG = _cfg(_INT8_W, _OFF, "max")
# FP8 weights are rounded with GPTQ rather than to nearest (ModelOpt: "max"): same format and
# scales, a third of the weight-induced error on SmolLM2 (KL 15.3e-3 -> 6.0e-3) for a few seconds
# more calibration. {"method": "max"} restores round-to-nearest.
FP8_DEFAULT_CFG = _cfg(_FP8, _FP8, "gptq")
FP8_PER_CHANNEL_PER_TOKEN_CFG = _cfg(
    {"num_bits": (4, 3), "axis": 0},
    {"num_bits": (4, 3), "type": "dynamic", "block_sizes": {-1: None}},
    "gptq",
)
FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG = _cfg(
    {"num_bits": (4, 3), "block_sizes": {-1: 128, -2: 128}, "enable": True}, _OFF, "max"
)
INT4_BLOCKWISE_WEIGHT_ONLY_CFG = _cfg(
    {"num_bits": 4, "block_sizes": {-1: 128}, "enable": True}, _OFF, "max"
)
# The INT4 AWQ presets search AWQ scales and then GPTQ-round the scaled weights (ModelOpt:
# awq_lite, round-to-nearest), one decoder layer at a time on the outputs of the layers already
# quantized when the model has a decoder stack: same format, pre-quant scale and export, less
# error (see the CHANGELOG for figures). {"method": "awq_lite", "alpha_step": 0.1} restores
# ModelOpt's.
_AWQ_GPTQ = {"method": "awq_gptq", "alpha_step": 0.1, "layerwise": "auto"}
INT4_AWQ_CFG = _cfg(_INT4_BLOCK, _OFF, _AWQ_GPTQ)
W4A8_AWQ_BETA_CFG = _cfg(
    [_INT4_BLOCK, {"num_bits": (4, 3), "axis": None, "enable": True}],
    {"num_bits": (4, 3), "axis": None, "enable": True},
    _AWQ_GPTQ,
)
NVFP4_DEFAULT_CFG = _cfg(_NVFP4, _NVFP4, "max")
# "Four over six" (ModelOpt: static weights, then an MSE search of the block amax multipliers 1.0
# and 1.5): here each block picks M=6 or M=4 by the same squared error inside the format, so
# max calibration gives the same weights.
NVFP4_FOUR_OVER_SIX_CFG = _cfg(
    {
        **_NVFP4,
        "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3), "four_over_six": True},
    },
    _NVFP4,
    "max",
)
NVFP4_AWQ_LITE_CFG = _cfg(_NVFP4, _NVFP4, "awq_lite")
NVFP4_AWQ_CLIP_CFG = _cfg(_NVFP4, _NVFP4, {"method": "awq_clip"})
NVFP4_AWQ_FULL_CFG = _cfg(_NVFP4, _NVFP4, {"method": "awq_full", "alpha_step": 0.1})
NVFP4_SVDQUANT_DEFAULT_CFG = _cfg(_NVFP4, _NVFP4, {"method": "svdquant", "lowrank": 32})
W4A16_NVFP4_CFG = _cfg(_NVFP4, _OFF, "max")
W4A8_NVFP4_FP8_CFG = _cfg(
    {**_NVFP4, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}},
    {"num_bits": (4, 3), "axis": None, "enable": True},
    "max",
)
MXFP8_DEFAULT_CFG = _cfg(_mx((4, 3)), _mx((4, 3)), None)
MXFP6_DEFAULT_CFG = _cfg(_mx((3, 2)), _mx((3, 2)), None)
MXFP4_DEFAULT_CFG = _cfg(_mx((2, 1)), _mx((2, 1)), None)
MXINT8_DEFAULT_CFG = _cfg(_mx(8), _mx(8), None)
# ModelOpt ships this one with algorithm None, which leaves its static FP8 input quantizers
# uncalibrated; here it calibrates them with max.
W4A8_MXFP4_FP8_CFG = _cfg(_mx((2, 1)), {"num_bits": (4, 3), "axis": None}, "max")
FP8_KV_CFG = _kv({"num_bits": (4, 3), "axis": None, "enable": True})
FP8_AFFINE_KV_CFG = _kv(
    {"num_bits": (4, 3), "axis": None, "bias": {-2: None, -4: None, "type": "static"}}
)
NVFP4_KV_CFG = _kv(dict(_NVFP4))
# Keys rotated by a normalized Hadamard transform before NVFP4, and queries rotated the same way
# by a disabled q_bmm_quantizer, so q k^T is unchanged; values plain NVFP4.
NVFP4_KV_ROTATE_CFG = freeze(
    {
        "quant_cfg": _entries(
            {
                "*q_bmm_quantizer": {"rotate": True, "enable": False},
                "*k_bmm_quantizer": {**_NVFP4, "rotate": True},
                "*v_bmm_quantizer": dict(_NVFP4),
                "default": {"enable": False},
            }
        ),
        "algorithm": "max",
    }
)

__all__ = [
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
    "FP8_AFFINE_KV_CFG",
    "FP8_DEFAULT_CFG",
    "FP8_KV_CFG",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "INT4_AWQ_CFG",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
    "INT8_DEFAULT_CFG",
    "INT8_SMOOTHQUANT_CFG",
    "INT8_WEIGHT_ONLY_CFG",
    "MXFP4_DEFAULT_CFG",
    "MXFP6_DEFAULT_CFG",
    "MXFP8_DEFAULT_CFG",
    "MXINT8_DEFAULT_CFG",
    "NVFP4_AWQ_CLIP_CFG",
    "NVFP4_AWQ_FULL_CFG",
    "NVFP4_AWQ_LITE_CFG",
    "NVFP4_DEFAULT_CFG",
    "NVFP4_FOUR_OVER_SIX_CFG",
    "NVFP4_KV_CFG",
    "NVFP4_KV_ROTATE_CFG",
    "NVFP4_SVDQUANT_DEFAULT_CFG",
    "W4A8_AWQ_BETA_CFG",
    "W4A8_MXFP4_FP8_CFG",
    "W4A8_NVFP4_FP8_CFG",
    "W4A16_NVFP4_CFG",
    "_default_disabled_quantizer_cfg",
    "choices",
]
# ModelOpt's set of built-in config names: the *_CFG entries of __all__ (one list of names).
choices: set[str] = {name for name in __all__ if name.endswith("_CFG")}

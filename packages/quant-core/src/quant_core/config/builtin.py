"""The built-in configs, with ModelOpt 0.47's exact ``quant_cfg`` entry lists for the same names.

Each is a read-only dict (see :mod:`quant_core.config.frozen`): ``cfg.copy()`` gives an editable
deep copy. ``quant_cfg`` is ModelOpt 0.47's ordered entry list that also takes the classic
``quant_cfg[pattern] = attributes`` edit (see :mod:`quant_core.config.frozen`). A weight /
activation config is ``[*_base_disable_all, weight and input entries,
*_default_disabled_quantizer_cfg]`` (LM heads, MoE routers and gates, embeddings, BatchNorm, output
layers, vision towers); a KV config holds only its KV entries, so
``FP8_DEFAULT_CFG["quant_cfg"] + FP8_KV_CFG["quant_cfg"]`` adds a KV cache to a preset as in
ModelOpt. Some algorithms differ from ModelOpt's (commented where set). Configs with
``"algorithm": "max"`` and static per-tensor inputs (INT8_DEFAULT_CFG, ...) get max's per-token
fallback: inputs whose calibration tokens defeat one per-tensor amax become per-token dynamic (see
:mod:`quant_core.algorithms.per_token_fallback`).
"""

from __future__ import annotations

from typing import Any

from quant_core.config.frozen import QuantCfgList, freeze


def _off(pattern: str, parent_class: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"quantizer_name": pattern}
    if parent_class is not None:
        entry["parent_class"] = parent_class
    entry["enable"] = False
    return entry


# ModelOpt 0.47's building blocks, as its entry lists: a recipe written
# ``[*_base_disable_all, {...}, *_default_disabled_quantizer_cfg]`` builds the same list here.
_base_disable_all: list[dict[str, Any]] = [_off("*")]
"""Switch every quantizer off; the first entry of every built-in W/A config."""

_default_disabled_quantizer_cfg: list[dict[str, Any]] = [
    _off("*block_sparse_moe.gate*"),  # MoE routers
    _off("*linear_attn.conv1d*"),  # linear-attention and Mamba convolutions, small projections
    _off("*self_attention.conv1d*"),
    _off("*linear_attn.in_proj_a*"),
    _off("*linear_attn.in_proj_b*"),
    _off("*lm_head*"),
    _off("*mixer.conv1d*"),
    _off("*mlp.gate.*"),
    _off("*mlp.shared_expert_gate.*"),
    _off("*output_layer*"),
    _off("*proj_out.*"),  # Whisper's LM head
    _off("*router*"),
    _off("mtp.*"),  # multi-token-prediction heads
    _off("output.*"),
    _off("*embed_vision*"),  # vision towers and multimodal projectors
    _off("*vision_tower*"),
    _off("*visual*"),
    _off("*vision_model*"),
    _off("*multi_modal_projector*"),
    _off("*", "nn.BatchNorm1d"),
    _off("*", "nn.BatchNorm2d"),
    _off("*", "nn.BatchNorm3d"),
    _off("*", "nn.LeakyReLU"),
    _off("*", "nn.Embedding"),
]
"""The exclusions every built-in W/A config ends with (LM heads, routers, vision towers, norms...)."""

_mamba_moe_disabled_quantizer_cfg: list[dict[str, Any]] = [
    _off("*fc1_latent_proj*"),
    _off("*fc2_latent_proj*"),
    _off("*q_proj*"),
    _off("*k_proj*"),
    _off("*v_proj*"),
    _off("*o_proj*"),
    _off("*self_attention.linear_qkv*"),
    _off("*self_attention.linear_proj*"),
]
"""ModelOpt 0.47's further exclusions for its Mamba-MoE presets (attention and latent projections)."""

_INT8_W = {"num_bits": 8, "axis": 0}
_INT8_A = {"num_bits": 8, "axis": None}
_FP8 = {"num_bits": (4, 3), "axis": None}
_INT4_BLOCK = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}
_NVFP4 = {
    "num_bits": (2, 1),
    "effective_bits": 4.5,
    "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
}
_OFF = None  # the quantizer's entry is {"quantizer_name": ..., "enable": False}
_ABSENT = ...  # no entry at all (the base "*" entry has switched it off)


def _mx(num_bits: int | tuple[int, int]) -> dict[str, Any]:
    return {"num_bits": num_bits, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}


def _quantizer(pattern: str, cfg: Any) -> list[dict[str, Any]]:
    if cfg is _ABSENT:
        return []
    if cfg is _OFF:
        return [_off(pattern)]
    return [{"quantizer_name": pattern, "cfg": cfg}]


def _cfg(weight: Any, inp: Any, algorithm: Any) -> dict[str, Any]:
    """A W/A config as ModelOpt 0.47 lays it out: disable all, weights, inputs, the exclusions."""
    return freeze(
        {
            "quant_cfg": QuantCfgList(
                [
                    *_base_disable_all,
                    *_quantizer("*weight_quantizer", weight),
                    *_quantizer("*input_quantizer", inp),
                    *_default_disabled_quantizer_cfg,
                ]
            ),
            "algorithm": algorithm,
        }
    )


def _kv(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A KV-cache config as in ModelOpt 0.47: only its KV entries, no catch-all and no algorithm.

    It is meant to be added to a W/A config (``FP8_DEFAULT_CFG["quant_cfg"] +
    FP8_KV_CFG["quant_cfg"]``); used alone, every quantizer it does not name keeps its default
    attributes, as in ModelOpt. For the KV cache alone, start from ``_base_disable_all``.
    """
    return freeze({"quant_cfg": QuantCfgList(entries), **extra})


INT8_DEFAULT_CFG = _cfg(_INT8_W, _INT8_A, "max")
INT8_SMOOTHQUANT_CFG = _cfg(_INT8_W, _INT8_A, "smoothquant")
INT8_WEIGHT_ONLY_CFG = _cfg(_INT8_W, _OFF, "max")
# FP8 weights are rounded with GPTQ rather than to nearest (ModelOpt: "max"): same format and
# scales, a third of the weight-induced error on SmolLM2 (KL 15.3e-3 -> 6.0e-3) for a few seconds
# more calibration. {"method": "max"} restores round-to-nearest.
FP8_DEFAULT_CFG = _cfg(_FP8, _FP8, "gptq")
FP8_PER_CHANNEL_PER_TOKEN_CFG = _cfg(
    {"num_bits": (4, 3), "axis": 0},
    {"num_bits": (4, 3), "axis": None, "type": "dynamic", "block_sizes": {-1: None}},
    "gptq",
)
FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG = _cfg(
    {"num_bits": (4, 3), "axis": None, "block_sizes": {-1: 128, -2: 128}}, _OFF, "max"
)
# INT4 weight-only rounds to nearest under per-block scales searched for the least output error
# (ModelOpt: "max", scale max|w_b| / 7, which leaves the code -8 unused): each block's amax is
# searched from 0.5 to 1.0 x max|w_b| for the least d^T H_bb d (the block's rounding error seen
# through its input Gram matrix), so clipped blocks use all 16 codes. Same format and export;
# SmolLM2 group 64: +43.3% -> +16.3% perplexity, where compressed-tensors' RTN (max|w_b| / 7.5,
# codes [-8, 7]) gives +35.9% (benchmarks/int4_rtn.py). Without calibration data the blocks' own
# squared error is searched. {"method": "max"} restores ModelOpt's.
_INT4_SEARCH = {
    "method": "local_hessian",
    "start_multiplier": 0.5,
    "stop_multiplier": 1.0,
    "step_size": 0.0125,
}
INT4_BLOCKWISE_WEIGHT_ONLY_CFG = _cfg(_INT4_BLOCK, _OFF, _INT4_SEARCH)
# The INT4 AWQ presets search AWQ scales and then GPTQ-round the scaled weights (ModelOpt:
# awq_lite, round-to-nearest), one decoder layer at a time on the outputs of the layers already
# quantized when the model has a decoder stack: same format, pre-quant scale and export, less
# error (see the CHANGELOG for figures). {"method": "awq_lite", "alpha_step": 0.1} restores
# ModelOpt's.
_AWQ_GPTQ = {"method": "awq_gptq", "alpha_step": 0.1, "layerwise": "auto"}
INT4_AWQ_CFG = _cfg(_INT4_BLOCK, _OFF, _AWQ_GPTQ)
W4A8_AWQ_BETA_CFG = _cfg([_INT4_BLOCK, _FP8], _FP8, _AWQ_GPTQ)
NVFP4_DEFAULT_CFG = _cfg(_NVFP4, _NVFP4, "max")
# "Four over six" (ModelOpt: static weights, then an MSE search of the block amax multipliers 1.0
# and 1.5): here each block picks M=6 or M=4 by the same squared error inside the format, so
# max calibration gives the same weights.
NVFP4_FOUR_OVER_SIX_CFG = _cfg(
    {
        "num_bits": (2, 1),
        "block_sizes": {-1: 16, "type": "static", "scale_bits": (4, 3), "four_over_six": True},
    },
    _NVFP4,
    "max",
)
NVFP4_AWQ_LITE_CFG = _cfg(_NVFP4, _NVFP4, "awq_lite")
NVFP4_AWQ_CLIP_CFG = _cfg(_NVFP4, _NVFP4, {"method": "awq_clip"})
NVFP4_AWQ_FULL_CFG = _cfg(_NVFP4, _NVFP4, {"method": "awq_full", "alpha_step": 0.1})
NVFP4_SVDQUANT_DEFAULT_CFG = _cfg(_NVFP4, _NVFP4, {"method": "svdquant", "lowrank": 32})
W4A16_NVFP4_CFG = _cfg(_NVFP4, _ABSENT, "max")
W4A8_NVFP4_FP8_CFG = _cfg(
    {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}},
    _FP8,
    "max",
)
MXFP8_DEFAULT_CFG = _cfg(_mx((4, 3)), _mx((4, 3)), None)
MXFP6_DEFAULT_CFG = _cfg(_mx((3, 2)), _mx((3, 2)), None)
MXFP4_DEFAULT_CFG = _cfg(_mx((2, 1)), _mx((2, 1)), None)
MXINT8_DEFAULT_CFG = _cfg(_mx(8), _mx(8), None)
# ModelOpt ships this one with algorithm None, which leaves its static FP8 input quantizers
# uncalibrated; here it calibrates them with max.
W4A8_MXFP4_FP8_CFG = _cfg(_mx((2, 1)), _FP8, "max")


def _preset(entries: list[dict[str, Any]], algorithm: Any, extra_off: tuple[str, ...] = ()) -> Any:
    """``[*_base_disable_all, *entries, *_default_disabled_quantizer_cfg, *extra_off]``, frozen."""
    return freeze(
        {
            "quant_cfg": QuantCfgList(
                [
                    *_base_disable_all,
                    *entries,
                    *_default_disabled_quantizer_cfg,
                    *(_off(p) for p in extra_off),
                ]
            ),
            "algorithm": algorithm,
        }
    )


def _wi(
    patterns: tuple[str, ...], cfg: dict[str, Any], inputs: bool = True
) -> list[dict[str, Any]]:
    """Weight (and input) entries with ``cfg`` for each module pattern."""
    kinds = ("weight_quantizer", "input_quantizer") if inputs else ("weight_quantizer",)
    return [{"quantizer_name": f"{p}{k}", "cfg": dict(cfg)} for p in patterns for k in kinds]


_NVFP4_B32 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}}
_MOE = ("*block_sparse_moe*",)
_EXPERTS = ("*block_sparse_moe*", "*.experts.*")
_MIXER_MLP = ("*.mixer.up_proj.", "*.mixer.down_proj.")
_MAMBA_OFF = tuple(e["quantizer_name"] for e in _mamba_moe_disabled_quantizer_cfg)
_MAMBA_CONSERVATIVE_OFF = (*_MAMBA_OFF, "*mixer.in_proj*", "*mixer.out_proj*")

# The parts-of-the-model presets (ModelOpt 0.47's, the same entry lists and algorithms).
NVFP4_MLP_WEIGHT_ONLY_CFG = _preset(_wi(("*mlp*", *_MOE), _NVFP4_B32, inputs=False), "max")
MXFP4_MLP_WEIGHT_ONLY_CFG = _preset(_wi(("*mlp*", *_MOE), _mx((2, 1)), inputs=False), None)
NVFP4_MLP_ONLY_CFG = _preset(_wi(("*mlp*", *_MIXER_MLP, *_EXPERTS), _NVFP4), "max")
NVFP4_EXPERTS_ONLY_CFG = _preset(_wi(_EXPERTS, _NVFP4), "max")
NVFP4_OMLP_ONLY_CFG = _preset(_wi(("*o_proj*", "*mlp*", *_MIXER_MLP, *_MOE), _NVFP4), "max")
# Mamba-MoE hybrids: attention and latent projections (conservative: also the mixer in/out
# projections) stay unquantized.
MAMBA_MOE_FP8_AGGRESSIVE_CFG = _preset(_wi(("*",), _FP8), "max", _MAMBA_OFF)
MAMBA_MOE_FP8_CONSERVATIVE_CFG = _preset(_wi(("*",), _FP8), "max", _MAMBA_CONSERVATIVE_OFF)
MAMBA_MOE_NVFP4_AGGRESSIVE_CFG = _preset(_wi(("*",), _NVFP4), "max", _MAMBA_OFF)
MAMBA_MOE_NVFP4_CONSERVATIVE_CFG = _preset(_wi(("*",), _NVFP4), "max", _MAMBA_CONSERVATIVE_OFF)

_KV = "*[kv]_bmm_quantizer"
FP8_KV_CFG = _kv({"quantizer_name": _KV, "cfg": dict(_FP8)})
# ModelOpt 0.47 lists the plain FP8 entry first and the affine one after it (the later one wins).
FP8_AFFINE_KV_CFG = _kv(
    {"quantizer_name": _KV, "cfg": dict(_FP8)},
    {
        "quantizer_name": _KV,
        "cfg": {**_FP8, "bias": {-2: None, -4: None, "type": "static"}},
    },
)
NVFP4_KV_CFG = _kv({"quantizer_name": _KV, "cfg": dict(_NVFP4)})
# As FP8_AFFINE_KV_CFG: the plain NVFP4 entry, then one with a static per-channel bias (later wins).
NVFP4_AFFINE_KV_CFG = _kv(
    {"quantizer_name": _KV, "cfg": dict(_NVFP4)},
    {"quantizer_name": _KV, "cfg": {**_NVFP4, "bias": {-2: None, -4: None, "type": "static"}}},
)
# Keys rotated by a normalized Hadamard transform before NVFP4, and queries rotated the same way
# by a disabled q_bmm_quantizer, so q k^T is unchanged; values plain NVFP4.
# Unlike ModelOpt 0.47's other KV configs, this one carries "algorithm": "max" there too.
NVFP4_KV_ROTATE_CFG = _kv(
    {"quantizer_name": "*q_bmm_quantizer", "cfg": {"rotate": True}, "enable": False},
    {"quantizer_name": "*k_bmm_quantizer", "cfg": {**_NVFP4, "rotate": True}},
    {"quantizer_name": "*v_bmm_quantizer", "cfg": dict(_NVFP4)},
    algorithm="max",
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
    "MAMBA_MOE_FP8_AGGRESSIVE_CFG",
    "MAMBA_MOE_FP8_CONSERVATIVE_CFG",
    "MAMBA_MOE_NVFP4_AGGRESSIVE_CFG",
    "MAMBA_MOE_NVFP4_CONSERVATIVE_CFG",
    "MXFP4_DEFAULT_CFG",
    "MXFP4_MLP_WEIGHT_ONLY_CFG",
    "MXFP6_DEFAULT_CFG",
    "MXFP8_DEFAULT_CFG",
    "MXINT8_DEFAULT_CFG",
    "NVFP4_AFFINE_KV_CFG",
    "NVFP4_AWQ_CLIP_CFG",
    "NVFP4_AWQ_FULL_CFG",
    "NVFP4_AWQ_LITE_CFG",
    "NVFP4_DEFAULT_CFG",
    "NVFP4_EXPERTS_ONLY_CFG",
    "NVFP4_FOUR_OVER_SIX_CFG",
    "NVFP4_KV_CFG",
    "NVFP4_KV_ROTATE_CFG",
    "NVFP4_MLP_ONLY_CFG",
    "NVFP4_MLP_WEIGHT_ONLY_CFG",
    "NVFP4_OMLP_ONLY_CFG",
    "NVFP4_SVDQUANT_DEFAULT_CFG",
    "W4A8_AWQ_BETA_CFG",
    "W4A8_MXFP4_FP8_CFG",
    "W4A8_NVFP4_FP8_CFG",
    "W4A16_NVFP4_CFG",
    "_base_disable_all",
    "_default_disabled_quantizer_cfg",
    "_mamba_moe_disabled_quantizer_cfg",
    "choices",
]
# ModelOpt's set of built-in config names: the *_CFG entries of __all__ (one list of names).
choices: set[str] = {name for name in __all__ if name.endswith("_CFG")}

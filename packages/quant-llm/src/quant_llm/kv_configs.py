"""KV-cache configs that quant-core lacks (INT8), and combining a KV-cache config with a weight/activation config.

quant-core ships FP8_KV_CFG, FP8_AFFINE_KV_CFG and NVFP4_KV_CFG; they configure the
``k_bmm_quantizer`` / ``v_bmm_quantizer`` that quant-llm adds to Hugging Face attention modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quant_core.config import _default_disabled_quantizer_cfg  # ModelOpt's exported name
from quant_core.config.entry_list import QuantCfgList
from quant_core.config.frozen import freeze, thaw
from quant_core.config.helpers import entry_dicts

KV_PATTERN = "*[kv]_bmm_quantizer"

INT8_KV_CFG: dict[str, Any] = freeze(
    {
        "quant_cfg": {
            KV_PATTERN: {"num_bits": 8, "axis": None, "enable": True},
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
)
"""Static per-tensor INT8 keys and values (scale = amax / 127), calibrated with ``max``."""


def with_kv_cache(config: Mapping[str, Any], kv_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` that also quantizes the KV cache as ``kv_config`` says.

    The KV entries (without their ``"default"``) go before ``config``'s default exclusions
    (LM head, routers, vision towers, ...), so those exclusions still win. Each config may use
    either shape of ``quant_cfg``; the result has the dict shape.
    """
    base, kv = thaw(dict(config)), thaw(dict(kv_config))
    for name, cfg in (("config", base), ("kv_config", kv)):
        quant_cfg = cfg.get("quant_cfg")
        if isinstance(quant_cfg, (list, tuple)):  # ModelOpt 0.47's entry list: as {pattern: value}
            pairs = QuantCfgList(entry_dicts(quant_cfg)).items()
            quant_cfg = {k: dict(v) if isinstance(v, Mapping) else v for k, v in pairs}
            cfg["quant_cfg"] = quant_cfg
        if not isinstance(quant_cfg, dict):
            raise TypeError(
                f"with_kv_cache: {name}['quant_cfg'] must be a dict of patterns or a list of entries"
            )
    exclusions = {
        k: v
        for k, v in base["quant_cfg"].items()
        if k in _default_disabled_quantizer_cfg and k != "default"
    }
    merged = {k: v for k, v in base["quant_cfg"].items() if k not in exclusions}
    merged.update({k: v for k, v in kv["quant_cfg"].items() if k != "default"})
    merged.update(exclusions)
    base["quant_cfg"] = merged
    return base

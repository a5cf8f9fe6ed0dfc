"""KV-cache configs that quant-core lacks (INT8), and combining a KV-cache config with a weight/activation config.

quant-core ships FP8_KV_CFG, FP8_AFFINE_KV_CFG, NVFP4_KV_CFG and NVFP4_KV_ROTATE_CFG; they
configure the ``k_bmm_quantizer`` / ``v_bmm_quantizer`` that quant-llm adds to Hugging Face and
Megatron attention modules. As in ModelOpt 0.47, a KV config's ``quant_cfg`` holds only its KV
entries, so ``FP8_DEFAULT_CFG["quant_cfg"] + FP8_KV_CFG["quant_cfg"]`` quantizes weights,
activations and the KV cache; for the KV cache alone, put ``_base_disable_all`` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quant_core.config import _default_disabled_quantizer_cfg  # ModelOpt's exported name
from quant_core.config.frozen import QuantCfgList, freeze, thaw
from quant_core.config.helpers import entry_dicts

KV_PATTERN = "*[kv]_bmm_quantizer"

INT8_KV_CFG: dict[str, Any] = freeze(
    {
        "quant_cfg": QuantCfgList(
            [{"quantizer_name": KV_PATTERN, "cfg": {"num_bits": 8, "axis": None}}]
        )
    }
)
"""Static per-tensor INT8 keys and values (scale = amax / 127), in the shape of ModelOpt's KV configs."""


def _catch_all_off(entry: Mapping[str, Any]) -> bool:
    return (
        entry.get("quantizer_name") == "*"
        and entry.get("parent_class") is None
        and entry.get("enable") is False
        and not entry.get("cfg")
    )


def with_kv_cache(config: Mapping[str, Any], kv_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` that also quantizes the KV cache as ``kv_config`` says.

    The KV entries go before the default exclusions that end ``config``'s entry list (LM head,
    routers, vision towers, ...: ``_default_disabled_quantizer_cfg``), so those exclusions still
    win; a catch-all ``{"quantizer_name": "*", "enable": False}`` among the KV entries (the
    ``"default"`` of an older dict-shaped KV config) is left out, since after the base entries it
    would switch them off. Either config may use either shape of ``quant_cfg``; the result holds an
    entry list (which also takes the dict shape's edits by pattern). ``config``'s algorithm is kept.
    """
    base, kv = thaw(dict(config)), thaw(dict(kv_config))
    lists = []
    for name, cfg in (("config", base), ("kv_config", kv)):
        quant_cfg = cfg.get("quant_cfg")
        if not isinstance(quant_cfg, (Mapping, list, tuple)):
            raise TypeError(
                f"with_kv_cache: {name}['quant_cfg'] must be a list of entries or a dict of "
                f"patterns, got {type(quant_cfg).__name__}"
            )
        lists.append(entry_dicts(quant_cfg))
    base_entries, kv_entries = lists
    kv_entries = [e for e in kv_entries if not _catch_all_off(e)]
    tail = len(base_entries)
    while tail and base_entries[tail - 1] in _default_disabled_quantizer_cfg:
        tail -= 1
    base["quant_cfg"] = QuantCfgList(base_entries[:tail] + kv_entries + base_entries[tail:])
    return base

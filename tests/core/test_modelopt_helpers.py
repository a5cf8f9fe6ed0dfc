"""ModelOpt 0.47 helper functions quant-core provides under ModelOpt's module paths, written from
their documented behaviour: the bare-name config lookup AutoQuantize uses, the NVFP4 conv helpers,
dict-style reads of ``QuantizerAttributeConfig``."""

from __future__ import annotations

import pytest
import torch

import quant_kernels as qk
from quant_core.algorithms import _match_quantizer_cfg
from quant_core.config import (
    QuantizerAttributeConfig,
    match_bare_quantizer_cfg,
    normalize_quant_cfg_list,
)
from quant_core.nn import TensorQuantizer
from quant_core.nn.modules.quant_conv import _is_nvfp4_quantizer, _nvfp4_quantize_weight_along_k

NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


# ----- match_bare_quantizer_cfg ----------------------------------------------------------------
def test_bare_lookup_is_last_match_wins_and_skips_parent_class_entries() -> None:
    entries = normalize_quant_cfg_list(
        [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8}},
            {"quantizer_name": "*mlp*weight_quantizer", "cfg": {"num_bits": 4}},
            {"quantizer_name": "*", "parent_class": "nn.Linear", "enable": False},
        ]
    )
    cfg, enable = match_bare_quantizer_cfg(entries, "weight_quantizer")
    assert cfg.num_bits == 4 and enable is True  # the path-scoped entry, by its suffix
    cfg, enable = match_bare_quantizer_cfg(entries, "input_quantizer")
    assert cfg is None and enable is False  # only the catch-all applies
    assert _match_quantizer_cfg is match_bare_quantizer_cfg


def test_bare_lookup_reads_wildcard_classes_and_plain_dicts() -> None:
    entries = [{"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}}]
    assert match_bare_quantizer_cfg(entries, "k_bmm_quantizer")[0] == {"num_bits": (4, 3)}
    assert match_bare_quantizer_cfg(entries, "q_bmm_quantizer") == (None, None)
    assert match_bare_quantizer_cfg([], "weight_quantizer") == (None, None)


# ----- NVFP4 conv helpers ----------------------------------------------------------------------
def test_is_nvfp4_quantizer_reads_the_format_not_the_enable_state() -> None:
    q = TensorQuantizer(QuantizerAttributeConfig(**NVFP4))
    assert _is_nvfp4_quantizer(q)
    q.disable()
    assert _is_nvfp4_quantizer(q)
    static = {**NVFP4, "block_sizes": {**NVFP4["block_sizes"], "type": "static"}}
    for attrs in ({"num_bits": 8}, {"num_bits": (4, 3)}, static):
        assert not _is_nvfp4_quantizer(TensorQuantizer(QuantizerAttributeConfig(**attrs)))
    assert not _is_nvfp4_quantizer(torch.nn.Identity())


def test_nvfp4_weight_along_k_blocks_the_gemm_reduction_axis() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 2, 2, 2, 2)  # K = 2 * 2 * 2 * 2 = 16: one NVFP4 block per output channel
    q = TensorQuantizer(QuantizerAttributeConfig(**NVFP4))
    got = _nvfp4_quantize_weight_along_k(w, q)
    assert got.shape == w.shape
    # Independent float64 reference: one E4M3 scale per output channel (the 16 values of K),
    # under the global scale amax / (6 * 448), then E2M1 round-to-nearest-even.
    w64 = w.double().reshape(4, 16)
    global_scale = w64.abs().max() / (6 * 448)
    block_scale = (w64.abs().amax(dim=1, keepdim=True) / 6 / global_scale).float()
    block_scale = block_scale.to(torch.float8_e4m3fn).double() * global_scale
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    scaled = (w64 / block_scale).abs()
    idx = (scaled.unsqueeze(-1) - grid).abs().argmin(dim=-1)
    ref = grid[idx] * w64.sign() * block_scale
    torch.testing.assert_close(got.double().reshape(4, 16), ref, atol=1e-6, rtol=1e-5)


# ----- dict-style attribute reads --------------------------------------------------------------
def test_quantizer_attribute_config_reads_like_a_dict() -> None:
    cfg = QuantizerAttributeConfig(num_bits=4, axis=0)
    assert cfg["num_bits"] == 4 and cfg.get("axis") == 0 and "block_sizes" in cfg
    with pytest.raises(KeyError):
        cfg["bits"]


def test_empty_list_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        normalize_quant_cfg_list([{}])


def test_format_of_nvfp4_is_dynamic_e2m1_under_e4m3_scales() -> None:
    fmt = TensorQuantizer(QuantizerAttributeConfig(**NVFP4)).format
    assert fmt.dynamic and fmt.scale_mode is qk.ScaleMode.E4M3


# ----- GroupedQuantizer ------------------------------------------------------------------------
def test_grouped_quantizer_keeps_one_quantizer_per_weight() -> None:
    from quant_core.nn import GroupedQuantizer, SequentialQuantizer

    a = TensorQuantizer(QuantizerAttributeConfig(num_bits=8), amax=1.0)
    b = TensorQuantizer(QuantizerAttributeConfig(num_bits=8), amax=4.0)
    grouped = GroupedQuantizer(a, b)
    x = torch.tensor([0.1234, -0.5678, 3.0])
    assert torch.equal(grouped(x), a(x)) and torch.equal(grouped[1](x), b(x))
    assert not torch.equal(a(x), b(x))  # the members keep their own amax
    assert torch.equal(grouped.amax, torch.tensor(1.0))
    assert list(grouped.state_dict()) == ["0._amax", "1._amax"]
    grouped.amax = 2.0
    assert all(torch.equal(q.amax, torch.tensor(2.0)) for q in grouped)
    grouped.disable()
    assert not a.is_enabled and not b.is_enabled
    grouped.enable()
    grouped.set_from_attribute_config([{"num_bits": 4}, {"enable": False}])
    assert (a.num_bits, a.is_enabled, b.is_enabled) == (4, True, False)
    grouped.reset_amax()  # a quantizer method: called on every member
    assert a.amax is None and b.amax is None
    nested = GroupedQuantizer(SequentialQuantizer(TensorQuantizer(), TensorQuantizer()), a)
    assert len(nested) == 2
    with pytest.raises(ValueError, match="TensorQuantizer or SequentialQuantizer"):
        GroupedQuantizer(torch.nn.Identity())


# ----- TensorQuantizerCache: a custom backend's scratch slot, never saved ----------------------
def test_custom_backend_keeps_its_cache_on_the_quantizer_unsaved() -> None:
    from quant_core.nn import TensorQuantizerCache, register_quant_backend, unregister_quant_backend

    class Table(TensorQuantizerCache):
        def __init__(self) -> None:
            self.offset = 0.5

    def backend(x: torch.Tensor, q: TensorQuantizer) -> torch.Tensor:
        if q._quantizer_cache is None:
            q._quantizer_cache = Table()
        return x + q._quantizer_cache.offset

    register_quant_backend("offset_cache_test", backend)
    try:
        q = TensorQuantizer(QuantizerAttributeConfig(backend="offset_cache_test"), amax=1.0)
        assert q._quantizer_cache is None
        x = torch.zeros(3)
        assert torch.equal(q(x), x + 0.5) and isinstance(q._quantizer_cache, Table)
        assert not any("cache" in k for k in q.state_dict())
        fresh = TensorQuantizer(QuantizerAttributeConfig(backend="offset_cache_test"), amax=2.0)
        fresh.load_state_dict(q.state_dict())
        assert fresh._quantizer_cache is None
    finally:
        unregister_quant_backend("offset_cache_test")

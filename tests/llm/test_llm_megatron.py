"""megatron-core tensor-parallel linears: quantizer insertion, config matching, TP amax sync on 2 gloo ranks, save/restore."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _megatron_cpu import REQUIRES_MEGATRON, free_port

pytestmark = REQUIRES_MEGATRON

IN, HIDDEN, OUT = 16, 32, 16


def _build(world: int, seed: int = 0):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
    torch.manual_seed(seed)  # the same master weights on every rank; each keeps its shard

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = ColumnParallelLinear(
                IN,
                HIDDEN,
                config=cfg,
                init_method=torch.nn.init.normal_,
                bias=True,
                gather_output=False,
            )
            self.fc2 = RowParallelLinear(
                HIDDEN,
                OUT,
                config=cfg,
                init_method=torch.nn.init.normal_,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            )

        def forward(self, x):
            return self.fc2(self.fc1(x)[0])[0]

    return Block()


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megatron.core import parallel_state

        import quant_core as mtq

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        block = _build(world)
        x = torch.randn(8, 2, IN, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = block(x)
        config = mtq.INT8_DEFAULT_CFG.copy()  # per-channel weights, per-tensor inputs
        mtq.quantize(block, config, lambda m: m(x))
        with torch.no_grad():
            after = block(x)
            # What fc2 saw during calibration: raw inputs, quantized weights (quant-core calibrates
            # activations with the weights already quantized).
            block.fc1.input_quantizer.disable()
            hidden_shard = block.fc1(x)[0]
            block.fc1.input_quantizer.enable()
        result = {
            "types": [type(block.fc1).__name__, type(block.fc2).__name__],
            "fc1_w_shard": block.fc1.weight.tolist(),
            "fc2_w_shard": block.fc2.weight.tolist(),
            "hidden_shard_amax": hidden_shard.abs().max().item(),
            "fc1_w_amax": block.fc1.weight_quantizer.amax.flatten().tolist(),
            "fc2_w_amax": block.fc2.weight_quantizer.amax.flatten().tolist(),
            "fc1_in_amax": block.fc1.input_quantizer.amax.item(),
            "fc2_in_amax": block.fc2.input_quantizer.amax.item(),
            "x_amax": x.abs().max().item(),
            "changed": (after - before).abs().max().item(),
        }
        # Megatron checkpoints its weights itself; the quantizer state travels beside them.
        fresh = _build(world, seed=5)
        mtq.restore_quantizer_state(fresh, mtq.quantizer_state(block))
        fresh.load_state_dict(block.state_dict())
        with torch.no_grad():
            result["restored_equal"] = bool(
                type(fresh.fc2).__name__ == "QuantRowParallelLinear"
                and torch.equal(fresh.fc2.weight_quantizer.amax, block.fc2.weight_quantizer.amax)
                and torch.equal(fresh(x), after)
            )
        mtq.fold_weight(fresh)  # weights written on their INT8 grid, weight quantizers off
        with torch.no_grad():
            scale = fresh.fc2.weight_quantizer.amax.double().reshape(-1, 1) / 127
            codes = fresh.fc2.weight.double() / scale
            result["folded"] = {
                "quantizers_off": not fresh.fc1.weight_quantizer.is_enabled
                and not fresh.fc2.weight_quantizer.is_enabled,
                "grid_error": (codes - codes.round()).abs().max().item(),
                "output_change": (fresh(x) - after).abs().max().item(),
            }
        result.update(_gpt_model_checks(world))
        result.update(_gpt_kv_cache_and_save_checks(world, rank, out_dir))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _gpt_model_checks(world: int) -> dict:
    """A megatron-core GPTModel built on CPU: quantizer insertion and config matching (its forward needs CUDA)."""
    from _megatron_cpu import build_gpt

    import quant_core as mtq
    from quant_core.conversion import iter_tensor_quantizers

    gpt = build_gpt(world)
    mtq.quantize(
        gpt, mtq.FP8_DEFAULT_CFG, None
    )  # weights only: calibrated from the weights, no forward
    enabled = sorted(n for n, q in iter_tensor_quantizers(gpt) if q.is_enabled)
    row_only = build_gpt(world)
    config = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {
                "quantizer_name": "*weight_quantizer",
                "parent_class": "RowParallelLinear",
                "cfg": {"num_bits": 8, "axis": 0},
            },
        ],
        "algorithm": "max",
    }
    mtq.quantize(row_only, config, None)
    return {
        "gpt_enabled": enabled,
        "gpt_proj_w_amax": gpt.decoder.layers[
            0
        ].self_attention.linear_proj.weight_quantizer.amax.item(),
        "gpt_proj_local_max": gpt.decoder.layers[0]
        .self_attention.linear_proj.weight.abs()
        .max()
        .item(),
        "row_only_enabled": sorted(n for n, q in iter_tensor_quantizers(row_only) if q.is_enabled),
    }


def _gpt_kv_cache_and_save_checks(world: int, rank: int, out_dir: str) -> dict:
    """KV-cache calibration of a tensor-parallel GPT (CPU forward), then mtq.save/restore of each rank's shard."""
    from _megatron_cpu import (
        allow_cpu_forward,
        build_gpt,
        gpt_batches,
        gpt_forward_loop,
        record_kv_maxima,
    )

    import quant_core as mtq
    from quant_core.conversion import iter_tensor_quantizers

    allow_cpu_forward()
    batches = gpt_batches(2)
    gpt = build_gpt(world)
    maxima, remove = record_kv_maxima(gpt)  # this rank's heads, before they are quantized
    kv_only = [*mtq.config._base_disable_all, *mtq.FP8_KV_CFG["quant_cfg"]]
    mtq.quantize(gpt, {"quant_cfg": kv_only}, gpt_forward_loop(batches))
    remove()
    kv_amax = [
        [
            layer.self_attention.core_attention.k_bmm_quantizer.amax.item(),
            layer.self_attention.core_attention.v_bmm_quantizer.amax.item(),
        ]
        for layer in gpt.decoder.layers
    ]
    path = os.path.join(out_dir, f"gpt_rank{rank}.safetensors")
    mtq.save(gpt, path)
    restored = mtq.restore(build_gpt(world, seed=5), path)
    ids, positions, mask = batches[0]
    saved = dict(iter_tensor_quantizers(gpt))
    with torch.no_grad():
        amax = [(q.amax, saved[n].amax) for n, q in iter_tensor_quantizers(restored)]
        restored_equal = (
            sum(a is not None for a, _ in amax) == 4  # k and v of 2 layers
            and all(a is b is None or torch.equal(a, b) for a, b in amax)
            and torch.equal(restored(ids, positions, mask), gpt(ids, positions, mask))
        )
    return {
        "kv_local_max": [maxima[i] for i in range(len(gpt.decoder.layers))],
        "kv_amax": kv_amax,
        "gpt_restored_equal": restored_equal,
    }


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    """Run the 2-rank tensor-parallel calibration once per session; returns each rank's results."""
    import torch.multiprocessing as mp
    from _session import once_per_session

    def spawn(out) -> None:
        mp.spawn(_rank_main, args=(2, free_port(), str(out)), nprocs=2, join=True)

    out = once_per_session(request, tmp_path_factory, "megatron_two_ranks", spawn)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_parallel_linears_are_converted_and_quantize(two_ranks):
    for result in two_ranks:
        assert result["types"] == ["QuantColumnParallelLinear", "QuantRowParallelLinear"]
        assert result["changed"] > 0


def test_fold_weight_writes_each_shard_on_its_int8_grid_and_keeps_the_output(two_ranks):
    for result in two_ranks:
        folded = result["folded"]
        assert folded["quantizers_off"]
        assert folded["grid_error"] < 1e-4
        assert folded["output_change"] < 1e-5


def test_row_parallel_per_channel_weight_amax_is_the_max_over_the_full_unsharded_row(two_ranks):
    full = torch.cat(
        [torch.tensor(r["fc2_w_shard"]) for r in two_ranks], dim=1
    )  # split along the input dim
    expected = full.abs().amax(dim=1)
    for result in two_ranks:
        torch.testing.assert_close(torch.tensor(result["fc2_w_amax"]), expected, rtol=0, atol=0)
    # Each shard alone would have given a different (smaller somewhere) amax: the sync mattered.
    local = torch.tensor(two_ranks[0]["fc2_w_shard"]).abs().amax(dim=1)
    assert (local < expected).any()


def test_column_parallel_per_channel_weight_amax_stays_local_to_each_shard(two_ranks):
    for result in two_ranks:
        torch.testing.assert_close(
            torch.tensor(result["fc1_w_amax"]),
            torch.tensor(result["fc1_w_shard"]).abs().amax(dim=1),
            rtol=0,
            atol=0,
        )


def test_activation_amax_agrees_across_ranks_and_is_the_global_max(two_ranks):
    assert two_ranks[0]["fc2_in_amax"] == two_ranks[1]["fc2_in_amax"]
    assert two_ranks[0]["fc2_in_amax"] == max(r["hidden_shard_amax"] for r in two_ranks)
    assert two_ranks[0]["fc1_in_amax"] == two_ranks[1]["fc1_in_amax"] == two_ranks[0]["x_amax"]


def test_quantizer_state_restores_on_a_fresh_parallel_model(two_ranks):
    assert [r["restored_equal"] for r in two_ranks] == [True, True]


def test_gpt_model_gets_quantizers_on_every_parallel_linear_but_the_output_layer(two_ranks):
    expected = sorted(
        f"decoder.layers.{i}.{m}.{q}"
        for i in range(2)
        for m in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        )
        for q in ("input_quantizer", "weight_quantizer")
    )
    for result in two_ranks:
        assert result["gpt_enabled"] == expected
    # Per-tensor FP8 weight amax of a row-parallel shard is the max over both (different) shards.
    assert two_ranks[0]["gpt_proj_local_max"] != two_ranks[1]["gpt_proj_local_max"]
    assert two_ranks[0]["gpt_proj_w_amax"] == two_ranks[1]["gpt_proj_w_amax"]
    assert two_ranks[0]["gpt_proj_w_amax"] == max(r["gpt_proj_local_max"] for r in two_ranks)


def test_parent_class_config_entries_match_megatron_classes(two_ranks):
    expected = sorted(
        f"decoder.layers.{i}.{m}.weight_quantizer"
        for i in range(2)
        for m in ("self_attention.linear_proj", "mlp.linear_fc2")
    )
    assert two_ranks[0]["row_only_enabled"] == expected


def test_kv_cache_amax_is_the_max_over_all_tensor_parallel_heads_on_every_rank(two_ranks):
    local = [torch.tensor(r["kv_local_max"]) for r in two_ranks]  # [layer, (k, v)] per rank
    assert not torch.equal(local[0], local[1])  # each rank saw different heads: the sync mattered
    expected = torch.maximum(local[0], local[1])
    expected = expected.amax(-1, keepdim=True).expand_as(expected)  # keys and values share one
    for result in two_ranks:
        torch.testing.assert_close(torch.tensor(result["kv_amax"]), expected, rtol=0, atol=0)


def test_each_rank_saves_and_restores_its_quantized_gpt_shard(two_ranks):
    assert [r["gpt_restored_equal"] for r in two_ranks] == [True, True]

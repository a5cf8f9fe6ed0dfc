"""Data-parallel calibration: two real gloo processes, each calibrating on its own shard, end with
the quantizer state and outputs of one process calibrating on the union of the shards.

One pair of processes runs every algorithm (starting them costs seconds; the algorithms
milliseconds). Each rank
gets one batch, so every sum over ranks is a sum of two float32 values, which rounds exactly as
the single-process accumulation does: sums (AWQ's mean |x| and Gram, GPTQ's Hessian) and maxima
are compared bit for bit. Histogram calibrators re-bin one rank's counts onto the common range,
which the single process does not always do, so their amax is compared within a stated number
of histogram bins (``HISTOGRAM_CASES``).
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quant_core as mtq
from quant_core.distributed import all_gather_rows, all_reduce
from quant_core.plugins import load_plugins

_INT8_W = {"num_bits": 8, "axis": 0}
_INT4_W = {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}}
_NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def _cfg(weight: dict, inputs: dict | None, algorithm) -> dict:
    off = {"enable": False}
    return {
        "quant_cfg": {
            "*weight_quantizer": weight,
            "*input_quantizer": inputs or off,
            "*output_quantizer": off,
        },
        "algorithm": algorithm,
    }


CASES = {
    "max": _cfg(_INT8_W, {"num_bits": 8, "axis": None}, "max"),
    "percentile": _cfg(_INT8_W, {"num_bits": 8, "axis": None, "calibrator": "percentile"}, "max"),
    "histogram_mse": _cfg(_INT8_W, {"num_bits": 8, "axis": None, "calibrator": "mse"}, "max"),
    "smoothquant": _cfg(
        _INT8_W, {"num_bits": 8, "axis": None}, {"method": "smoothquant", "alpha": 0.5}
    ),
    "awq_full": _cfg(_INT4_W, None, {"method": "awq_full", "alpha_step": 0.25}),
    "gptq": _cfg(_INT4_W, None, "gptq"),
    "nvfp4_act_headroom": _cfg(_NVFP4, _NVFP4, "nvfp4_act_headroom"),
}
HISTOGRAM_CASES = {"percentile": 2, "histogram_mse": 24}
"""Tolerance in histogram bins (of 2048): the MSE search steps 8 bins at a time (num_bins / 256)."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    with torch.no_grad():
        model[0].weight[:, 3] *= 8  # an outlier channel for smoothquant / awq to act on
    return model


def _shards() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shards = [torch.randn(2, 8, 64, generator=gen) for _ in range(2)]
    shards[0][..., 5] *= 6  # the ranks see different ranges
    return shards


def _calibrate(name: str, batches: list[torch.Tensor], device: str = "cpu") -> dict:
    model = _model().to(device)

    def forward_loop(m: nn.Module) -> None:
        for x in batches:
            m(x.to(device))

    mtq.quantize(model, copy.deepcopy(CASES[name]), forward_loop)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    probe = torch.linspace(-3, 3, 4 * 64, device=device).reshape(4, 64)
    state["output"] = model(probe).detach().cpu()
    return state


def _worker(rank: int, world: int, port: int, out: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = {name: _calibrate(name, [_shards()[rank]], device) for name in CASES}
        # the helpers themselves: a statistic only one rank has, rows of unequal counts
        only = torch.full((3,), float(rank + 1)) if rank == 1 else None
        results["helpers"] = {
            "sum": all_reduce([only, torch.tensor([rank + 0.5])], "sum")[0],
            "rows": all_gather_rows(torch.full((rank + 1, 2), float(rank)), 2, torch.float32),
        }
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    load_plugins()  # once here, inherited by the forked ranks (a fresh import costs seconds)
    mp.start_processes(
        _worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="fork"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def union() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' BLAS runs single-threaded: same rounding
    try:
        return {name: _calibrate(name, _shards()) for name in CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [n for n in CASES if n not in HISTOGRAM_CASES])
def test_two_rank_calibration_equals_union_calibration_bit_for_bit(two_ranks, union, name):
    ref = union[name]
    for rank in two_ranks:
        got = rank[name]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(got[key], value), f"{name}: {key} differs"


@pytest.mark.parametrize("name", HISTOGRAM_CASES)
def test_two_rank_histogram_calibration_is_within_two_bins_of_union(two_ranks, union, name):
    ref = union[name]
    for key, value in ref.items():
        if key.endswith("input_quantizer._amax"):
            # both ranks agree exactly; the union differs by the re-binning only
            assert torch.equal(two_ranks[0][name][key], two_ranks[1][name][key])
            top = max(float(value), float(two_ranks[0][name][key]))
            tolerance = HISTOGRAM_CASES[name] * top / 2048
            assert abs(float(two_ranks[0][name][key]) - float(value)) <= tolerance, key
        elif "weight" in key:
            assert torch.equal(two_ranks[0][name][key], value), key


def test_reduction_helpers_fill_missing_statistics_and_gather_unequal_rows(two_ranks):
    for rank in two_ranks:
        torch.testing.assert_close(rank["helpers"]["sum"], torch.full((3,), 2.0))
        torch.testing.assert_close(
            rank["helpers"]["rows"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one CUDA device per rank")
def test_two_rank_nccl_calibration_equals_union_calibration(tmp_path):
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(tmp_path), "nccl"),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("max", "smoothquant", "awq_full", "gptq"):
        ref = _calibrate(name, _shards(), "cuda:0")
        for rank in ranks:
            for key, value in ref.items():
                # cuBLAS may sum in another order on another device: amax exact, the rest close
                torch.testing.assert_close(rank[name][key], value, rtol=1e-4, atol=1e-5)


def test_reduction_helpers_are_identity_without_a_process_group():
    x = torch.ones(2)
    assert all_reduce([x, None], "max") == [x, None]
    rows = x.view(1, 2)
    assert all_gather_rows(rows, 2, torch.float32) is rows
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce([x], "mean")

"""Data-parallel calibration refuses ranks that hold different models or configs (two gloo ranks)."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import quant_core as mtq
from quant_core.preflight import model_fingerprint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, case: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        width = 24 if case == "model" and rank == 1 else 16
        model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 8))
        config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
        if case == "config" and rank == 1:
            config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
        x = torch.randn(4, 16) + rank  # the data may differ
        try:
            mtq.quantize(model, config, lambda m: m(x))
            result = "ok"
        except ValueError as err:
            result = str(err)
        with open(f"{out}/rank{rank}.txt", "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


def _run(case: str, tmp_path) -> list[str]:
    mp.start_processes(
        _worker, args=(_free_port(), case, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


@pytest.mark.parametrize("case", ["model", "config"])
def test_ranks_with_different_models_or_configs_are_refused_on_every_rank(case, tmp_path):
    results = _run(case, tmp_path)
    for message in results:
        assert message.startswith("mtq.quantize: the data-parallel ranks hold different models")
        assert "ranks [0]; ranks [1]" in message


def test_ranks_with_the_same_model_and_config_calibrate(tmp_path):
    assert _run("same", tmp_path) == ["ok", "ok"]


def test_the_fingerprint_sees_shapes_quantizer_settings_and_config():
    model = nn.Linear(4, 4)
    base = model_fingerprint(model, mtq.INT8_DEFAULT_CFG)
    assert base == model_fingerprint(nn.Linear(4, 4), copy.deepcopy(mtq.INT8_DEFAULT_CFG))
    assert base != model_fingerprint(nn.Linear(4, 5), mtq.INT8_DEFAULT_CFG)
    assert base != model_fingerprint(model, mtq.FP8_DEFAULT_CFG)

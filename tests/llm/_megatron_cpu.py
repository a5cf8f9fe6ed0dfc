"""Test helpers: build megatron-core GPT models on CPU (gloo) and let their forward run there.

megatron-core 0.16 runs a GPT forward only on CUDA for two reasons, both outside quant's code:
``DotProductAttention`` takes its attention-score scratch tensor from a global buffer allocated
with ``device=torch.cuda.current_device()``, and it forks the CUDA RNG tracker around attention
dropout. :func:`allow_cpu_forward` hands out CPU scratch tensors instead (``torch.baddbmm`` runs
with ``beta=0``, so their contents are never read) and installs megatron's own inference RNG
tracker, whose fork does nothing. Everything else in the forward is megatron's unchanged code.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable

import pytest
import torch

VOCAB, SEQ = 64, 8
HAVE_MEGATRON = (
    importlib.util.find_spec("megatron") is not None
    and importlib.util.find_spec("megatron.core") is not None
)
REQUIRES_MEGATRON = [
    pytest.mark.megatron,
    pytest.mark.skipif(
        not HAVE_MEGATRON, reason="megatron-core is not installed (pip install 'quant-llm[nemo]')"
    ),
]
"""``pytestmark`` of the megatron test modules."""


def free_port() -> int:
    """A free TCP port on localhost for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allow_cpu_forward() -> Callable[[], None]:
    """Let megatron's GPT forward run on CPU tensors; returns a function that undoes it."""
    from megatron.core import utils
    from megatron.core.tensor_parallel import random

    original = utils.GlobalMemoryBuffer.get_tensor

    def cpu_scratch(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)

    utils.GlobalMemoryBuffer.get_tensor = cpu_scratch
    random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    def undo() -> None:
        utils.GlobalMemoryBuffer.get_tensor = original
        random.initialize_rng_tracker(force_reset=True)

    return undo


def init_parallel(rank: int, world: int, port: int) -> None:
    """Start gloo and megatron's model-parallel groups with tensor parallelism over all ``world`` ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)


def shutdown_parallel() -> None:
    """Undo :func:`init_parallel`."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def tiny_config(num_layers: int, world: int = 1):
    """A megatron TransformerConfig: hidden 32, 4 heads in 2 query groups, CPU initialization."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
        tensor_model_parallel_size=world,
    )


def build_gpt(world: int = 1, seed: int = 0) -> torch.nn.Module:
    """A 2-layer megatron-core GPTModel (local, TE-free layer spec; :func:`tiny_config`) in eval mode."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)  # the same master weights on every rank; each keeps its shard
    model = GPTModel(
        config=tiny_config(2, world),
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=32,
    )
    return model.eval()


def gpt_batches(count: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """``count`` (input_ids, position_ids, causal attention_mask) batches of 2 x SEQ tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    positions = torch.arange(SEQ).expand(2, SEQ)
    return [(torch.randint(0, VOCAB, (2, SEQ), generator=g), positions, mask) for _ in range(count)]


def gpt_forward_loop(batches: list[tuple[torch.Tensor, ...]]) -> Callable[[torch.nn.Module], None]:
    """A forward_loop running ``batches`` through a GPTModel."""

    def loop(model: torch.nn.Module) -> None:
        for ids, positions, mask in batches:
            model(ids, positions, mask)

    return loop


def record_kv_maxima(model: torch.nn.Module) -> tuple[dict[int, list[float]], Callable[[], None]]:
    """Record max |key| and max |value| entering each layer's core attention; returns (maxima, remove)."""
    maxima: dict[int, list[float]] = {}

    def hook(i: int):
        def on_call(_module, args):
            k, v = args[1].abs().max().item(), args[2].abs().max().item()
            old = maxima.get(i, [0.0, 0.0])
            maxima[i] = [max(old[0], k), max(old[1], v)]

        return on_call

    handles = [
        layer.self_attention.core_attention.register_forward_pre_hook(hook(i))
        for i, layer in enumerate(model.decoder.layers)
    ]
    return maxima, lambda: [h.remove() for h in handles]

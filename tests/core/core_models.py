"""Small models shared by the quant-core tests (imported by name: every test folder has its own conftest)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant_core.nn import BMM


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stack with a transposed conv and a linear head (every module kind core maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.up(torch.relu(self.conv2(x))))  # (B, 8, 16, 16)
        x = self.conv1d(x.mean(-1))  # (B, 8, 16)
        return self.head(x.flatten(1))


class TinyAttention(nn.Module):
    """Single-head self-attention whose two matmuls are `BMM` modules (`*.bmm.*` patterns)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bmm = BMM()
        self.bmm2 = BMM()
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(self.bmm(q, k.transpose(-1, -2)) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(self.bmm2(att, v))


class TinyTransformer(nn.Module):
    """Attention block + MLP, enough structure for the guide examples."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.attn = TinyAttention(dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.attn(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_tiny_llama():
    """A 1-layer Llama from a config (no download); skips when transformers is absent."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()

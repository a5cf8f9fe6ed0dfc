"""Grouping: layers that must share one format (q/k/v, gate/up, all experts of one MoE block)."""

from __future__ import annotations

import re

# Sibling projections fused at deployment: each tuple names layers that share a format.
SHARED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)
_EXPERTS = re.compile(r"^(.*\.experts)\.\d+\.(.*)$")


def group_key(name: str) -> str:
    """The group a layer belongs to: one key for every layer that must get the same format."""
    m = _EXPERTS.match(name)
    if m:  # every expert of one MoE block, per projection kind
        name = f"{m.group(1)}.*.{m.group(2)}"
    parent, _, leaf = name.rpartition(".")
    for siblings in SHARED_SIBLINGS:
        if leaf in siblings:
            return f"{parent}.{'|'.join(siblings)}" if parent else "|".join(siblings)
    return name


def group_layers(names: list[str]) -> dict[str, list[str]]:
    """Group key -> its layer names, in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_key(name), []).append(name)
    return groups

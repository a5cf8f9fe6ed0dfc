"""Every Python example in the root README runs as written (it needs all four layers installed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quant_core.nn import QuantModuleRegistry

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files (checkpoints, ONNX) into the working folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An example may mtq.register a user class: keep that from leaking into later tests.
    monkeypatch.setattr(QuantModuleRegistry, "_user", dict(QuantModuleRegistry._user))
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})

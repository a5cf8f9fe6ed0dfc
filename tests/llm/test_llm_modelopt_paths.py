"""ModelOpt's ``quantization.plugins.huggingface`` path, served lazily by quant-llm's plugin entry point."""

from __future__ import annotations

import pytest


def test_plugins_huggingface_names_come_from_quant_llm() -> None:
    from quant_core.plugins import huggingface
    from quant_llm.hf_linear import QuantConv1D
    from quant_llm.plugin import register_model

    assert huggingface.QuantConv1D is QuantConv1D
    assert huggingface.register_hf_attentions_on_the_fly is register_model
    with pytest.raises(AttributeError, match="available"):
        huggingface.NoSuchName  # noqa: B018

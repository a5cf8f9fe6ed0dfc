"""Moved to :mod:`quant_llm.testing.tiny_models`; this name stays importable (the same module object)."""

import sys

from quant_llm.testing import tiny_models as _moved

sys.modules[__name__] = _moved

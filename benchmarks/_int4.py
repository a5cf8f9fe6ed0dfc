"""INT4 block-wise configs at another group size, shared by the INT4 benchmark scripts.

Benchmarks import it as ``from _int4 import with_group`` (a script's folder is on ``sys.path``).
"""

from __future__ import annotations

from typing import Any


def with_group(config: Any, group: int, algorithm: Any = None) -> dict:
    """A copy of an INT4 block-wise ``config`` with weight blocks of ``group`` input columns (and
    ``algorithm`` when given)."""
    config = config.copy()
    weight = config["quant_cfg"]["*weight_quantizer"]
    config["quant_cfg"]["*weight_quantizer"] = {
        **weight,
        "block_sizes": {**weight["block_sizes"], -1: group},
    }
    if algorithm is not None:
        config["algorithm"] = algorithm
    return config

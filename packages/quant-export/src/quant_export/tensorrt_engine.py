"""``build_engine``: an exported ONNX Q/DQ graph to a serialized TensorRT engine.

Written against TensorRT's Python API (``Builder``, ``OnnxParser``, ``BuilderConfig``, optimization
profiles). TensorRT is imported only when an engine is built; without it the error says what to
install. Graphs with explicit Q/DQ are built as strongly-typed networks by default, so TensorRT
takes each tensor's precision from the graph instead of choosing its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quant_core.atomic import atomic_temp

TENSORRT_MISSING = (
    "building TensorRT engines needs the tensorrt package (TensorRT 10 or newer) and an NVIDIA GPU: "
    "pip install quant-export[tensorrt]   (or: pip install tensorrt)"
)
PRECISIONS = ("fp16", "bf16", "int8", "fp8", "int4", "fp4")


def import_tensorrt() -> Any:
    """Import tensorrt, or raise ImportError saying exactly what to install."""
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError(TENSORRT_MISSING) from err
    return tensorrt


Shape = Sequence[int]


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    precisions: Iterable[str] = (),
    strongly_typed: bool = True,
    profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]] = (),
    workspace_bytes: int = 4 << 30,
) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser, build an engine and write it atomically.

    ``precisions`` names builder flags (``fp16``, ``bf16``, ``int8``, ``fp8``, ``int4``, ``fp4``) for
    weakly-typed builds; a strongly-typed build (the default, right for explicit Q/DQ graphs) takes
    no precision flags. ``profiles`` is a list of ``{input name: (min, opt, max) shape}``, one per
    optimization profile, needed when the graph has dynamic axes.
    """
    precisions = [p.lower() for p in precisions]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
    if strongly_typed and precisions:
        raise ValueError(
            f"a strongly-typed network takes its precisions from the graph; drop {precisions} "
            "or pass strongly_typed=False"
        )
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    if not engine_path.parent.is_dir() or not os.access(engine_path.parent, os.W_OK):
        raise PermissionError(f"cannot write the engine to {engine_path}")
    trt = import_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for precision in precisions:
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine from {onnx_path} (see its log above)"
        )
    tmp = atomic_temp(engine_path)
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(serialized))
        os.replace(tmp, engine_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return engine_path

"""Graph clean-up after lowering, with onnx-graphsurgeon.

* constant folding of the float parts (never of a DequantizeLinear: stored codes stay codes);
* Q/DQ pairs that cancel (``DequantizeLinear -> QuantizeLinear`` with the same scale and zero point)
  are removed, so back-to-back quantizers do not re-quantize;
* a per-tensor DequantizeLinear followed by data-movement ops (Reshape, Transpose, ...) is moved
  past them, so Q/DQ sits directly before the Conv/MatMul/Gemm that TensorRT and onnxruntime fuse.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _same_constant(a: gs.Tensor | None, b: gs.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    if not (isinstance(a, gs.Constant) and isinstance(b, gs.Constant)):
        return False
    return a.values.dtype == b.values.dtype and np.array_equal(
        np.asarray(a.values), np.asarray(b.values)
    )


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i else None


def cancel_qdq_pairs(graph: gs.Graph) -> int:
    """Bypass ``Q(DQ(q))`` when both use the same scale, zero point and axis; returns how many."""
    removed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        x = q.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "DequantizeLinear":
            continue
        dq = x.inputs[0]
        if q.attrs != dq.attrs or not all(
            _same_constant(_input(q, i), _input(dq, i)) for i in (1, 2)
        ):
            continue
        codes = dq.inputs[0]
        for consumer in list(q.outputs[0].outputs):
            consumer.inputs[:] = [codes if t is q.outputs[0] else t for t in consumer.inputs]
        graph.outputs[:] = [codes if t is q.outputs[0] else t for t in graph.outputs]
        q.outputs.clear()
        removed += 1
    graph.cleanup()
    return removed


def sink_dequantize(graph: gs.Graph) -> int:
    """Move per-tensor DequantizeLinear past data-movement ops toward the compute op; returns how many."""
    moved = 0
    changed = True
    while changed:
        changed = False
        for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
            scale = dq.inputs[1]
            out = dq.outputs[0]
            if (
                not isinstance(scale, gs.Constant)
                or np.asarray(scale.values).size != 1
                or dq.attrs.get("block_size")
            ):
                continue
            consumers = list(out.outputs)
            if len(consumers) != 1 or consumers[0].op not in _MOVEMENT or out in graph.outputs:
                continue
            move = consumers[0]
            if move.inputs[0] is not out:
                continue
            codes = dq.inputs[0]
            result = move.outputs[0]
            moved_codes = gs.Variable(f"{result.name}.codes", dtype=codes.dtype)
            move.inputs[0] = codes
            move.outputs[:] = [moved_codes]
            dq.inputs[0] = moved_codes
            dq.outputs[:] = [result]
            moved += 1
            changed = True
        graph.toposort()
    return moved


def fold_float_constants(graph: gs.Graph) -> None:
    """Constant-fold everything except Q/DQ nodes and custom-domain ops."""
    graph.fold_constants(
        error_ok=True,
        should_exclude_node=lambda node: node.op in _QDQ or bool(node.domain),
    ).cleanup()


def clean(graph: gs.Graph) -> gs.Graph:
    """Run all clean-up passes in order; returns the same graph, topologically sorted."""
    fold_float_constants(graph)
    cancel_qdq_pairs(graph)
    sink_dequantize(graph)
    return graph.cleanup().toposort()

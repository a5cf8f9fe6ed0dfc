"""The decoder graph onnxruntime-genai runs, written node by node from a Llama-family model.

Names, inputs, outputs and the contrib ops follow onnxruntime-genai's own builder
(``onnxruntime_genai/models/builders/base.py`` in microsoft/onnxruntime-genai 0.18: ``make_inputs_and_outputs``,
``make_attention_mask_reformatting`` for GroupQueryAttention, ``make_layernorm``,
``make_rotary_embedding_caches``, ``make_matmul_int4``), so the runtime's decoder finds what it
expects. Per layer::

    x = SimplifiedLayerNormalization(h)            (layer 0; then SkipSimplifiedLayerNormalization,
    qkv = MatMul[NBits](x)                          whose output 3 is the residual sum)
    a, present.i.key, present.i.value = GroupQueryAttention(qkv, past..., seqlens_k,
                                            total_sequence_length, cos_cache, sin_cache)
    x, h = SkipSimplifiedLayerNormalization(h, MatMul[NBits](a))
    m = MatMul[NBits](silu(MatMul[NBits](x)) * MatMul[NBits](x))

then the final norm and the LM head write ``logits``. ``seqlens_k`` is ``sum(attention_mask) - 1``
and ``total_sequence_length`` the mask's width (both int32), as GroupQueryAttention takes them;
rotary embeddings are applied inside GroupQueryAttention from cos/sin caches computed by the
model's own rotary module (``rotate_half`` layout: ``rotary_interleaved=0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from quant_export.onnx_genai.weights import FloatWeight, NBitsWeight, Weight

__all__ = ["DecoderSpec", "GraphWriter", "build_decoder"]

MS = "com.microsoft"
OPSET = 21  # default-domain opset of the graph (onnxruntime 1.20+ runs it)


@dataclass
class DecoderSpec:
    """The shapes and numbers of a Llama-family decoder that the graph and genai_config need."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    context_length: int
    cos: np.ndarray  # (context_length, head_dim / 2) float32
    sin: np.ndarray


@dataclass
class GraphWriter:
    """Collects nodes and initializers; names are unique by construction (``/path/op/output_0``)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as initializer ``name``; returns the name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        path: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Add one node named ``path/op``; returns its output names."""
        name = f"{path}/{op}"
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)
        )
        return outputs

    def linear(
        self, x: str, weight: Weight, path: str, accuracy_level: int, out: str | None = None
    ) -> str:
        """``x @ W.T (+ b)`` as MatMul or MatMulNBits; returns the output name (``out`` if given)."""
        prefix = path.strip("/").replace("/", ".")
        mm_out: int | list[str] = 1 if out is None or weight.bias is not None else [out]
        if isinstance(weight, FloatWeight):
            w = self.const(f"{prefix}.MatMul.weight", weight.weight_t)
            (y,) = self.node("MatMul", [x, w], path, mm_out)
        else:
            assert isinstance(weight, NBitsWeight)
            q = self.const(f"{prefix}.MatMul.weight_Q{weight.bits}", weight.packed)
            s = self.const(f"{prefix}.MatMul.weight_scales", weight.scales)
            (y,) = self.node(
                "MatMulNBits",
                [x, q, s],
                path,
                mm_out,
                domain=MS,
                K=weight.k,
                N=weight.n,
                bits=weight.bits,
                block_size=weight.block_size,
                accuracy_level=accuracy_level,
            )
        if weight.bias is not None:
            b = self.const(f"{prefix}.bias", weight.bias)
            (y,) = self.node("Add", [y, b], f"{path}/bias", 1 if out is None else [out])
        return y


def _io(spec: DecoderSpec) -> tuple[list, list]:
    """Graph inputs and outputs under the names genai_config.json gives the runtime."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
    present = ["batch_size", spec.kv_heads, "total_sequence_length", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", i64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", spec.vocab])
    ]
    for i in range(spec.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present))
    return inputs, outputs


def _mask_inputs(g: GraphWriter) -> tuple[str, str]:
    """(seqlens_k, total_sequence_length) from ``attention_mask``, as GroupQueryAttention takes them."""
    path = "/model/attn_mask_reformat/attn_mask_subgraph"
    one = g.const("/model/constants/INT64/[1]", np.array([1], dtype=np.int64))
    one_scalar = g.const("/model/constants/INT64/1", np.array(1, dtype=np.int64))
    (total,) = g.node("ReduceSum", ["attention_mask", one], path, keepdims=0)
    (last,) = g.node("Sub", [total, one], path)
    (seqlens,) = g.node("Cast", [last], f"{path}/Sub", to=TensorProto.INT32)
    (shape,) = g.node("Shape", ["attention_mask"], path)
    (width,) = g.node("Gather", [shape, one_scalar], path, axis=0)
    (total_len,) = g.node("Cast", [width], f"{path}/Gather", to=TensorProto.INT32)
    return seqlens, total_len


def _embedding(g: GraphWriter, embed: np.ndarray | NBitsWeight) -> str:
    """The token embeddings of ``input_ids``: Gather on a float table, or GatherBlockQuantized
    (com.microsoft) on INT4 rows packed as MatMulNBits packs them (default zero point 8)."""
    path = "/model/embed_tokens"
    if isinstance(embed, np.ndarray):
        table = g.const("model.embed_tokens.weight", embed)
        return g.node("Gather", [table, "input_ids"], path)[0]
    rows = embed.packed.reshape(embed.n, -1)  # (vocab, hidden * bits / 8): blocks are contiguous
    q = g.const(f"model.embed_tokens.weight_Q{embed.bits}", rows)
    s = g.const("model.embed_tokens.weight_scales", embed.scales)
    return g.node(
        "GatherBlockQuantized",
        [q, "input_ids", s],
        path,
        domain=MS,
        bits=embed.bits,
        block_size=embed.block_size,
        gather_axis=0,
        quantize_axis=1,
    )[0]


def build_decoder(
    spec: DecoderSpec,
    embed: np.ndarray | NBitsWeight,
    layers: list[dict[str, Any]],
    final_norm: np.ndarray,
    lm_head: Weight,
    accuracy_level: int,
) -> onnx.ModelProto:
    """The decoder ModelProto.

    ``embed`` is the float table or its INT4 rows. ``layers[i]`` holds ``input_norm`` / ``post_norm`` (numpy weights) and the Weights ``qkv``
    (fused, or a ``(q, k, v)`` tuple), ``o``, ``gate``, ``up``, ``down``.
    """
    g = GraphWriter()
    seqlens, total_len = _mask_inputs(g)
    cos = g.const("cos_cache", spec.cos)
    sin = g.const("sin_cache", spec.sin)
    h = _embedding(g, embed)
    mlp_out = None
    for i, layer in enumerate(layers):
        path = f"/model/layers.{i}"
        w_in = g.const(f"model.layers.{i}.input_layernorm.weight", layer["input_norm"])
        if mlp_out is None:
            (x,) = g.node(
                "SimplifiedLayerNormalization",
                [h, w_in],
                f"{path}/input_layernorm",
                ["/model/layers.0/input_layernorm/output_0"],
                epsilon=spec.eps,
                axis=-1,
                stash_type=1,
            )
            residual = h
        else:
            x, residual = _skip_norm(g, residual, mlp_out, w_in, f"{path}/input_layernorm", spec)
        qkv = layer["qkv"]
        if isinstance(qkv, tuple):
            q, k, v = (
                g.linear(x, w, f"{path}/attn/{n}_proj/MatMul", accuracy_level)
                for w, n in zip(qkv, "qkv")
            )
        else:
            q = g.linear(x, qkv, f"{path}/attn/qkv_proj/MatMul", accuracy_level)
            k = v = ""
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [q, k, v, *past, seqlens, total_len, cos, sin],
            f"{path}/attn",
            [f"{path}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            domain=MS,
            num_heads=spec.heads,
            kv_num_heads=spec.kv_heads,
            scale=float(spec.head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=-1,
        )
        o = g.linear(attn, layer["o"], f"{path}/attn/o_proj/MatMul", accuracy_level)
        w_post = g.const(f"model.layers.{i}.post_attention_layernorm.weight", layer["post_norm"])
        x, residual = _skip_norm(g, residual, o, w_post, f"{path}/post_attention_layernorm", spec)
        gate = g.linear(x, layer["gate"], f"{path}/mlp/gate_proj/MatMul", accuracy_level)
        up = g.linear(x, layer["up"], f"{path}/mlp/up_proj/MatMul", accuracy_level)
        (sig,) = g.node("Sigmoid", [gate], f"{path}/mlp/act_fn")
        (act,) = g.node("Mul", [gate, sig], f"{path}/mlp/act_fn")
        (prod,) = g.node("Mul", [act, up], f"{path}/mlp")
        mlp_out = g.linear(prod, layer["down"], f"{path}/mlp/down_proj/MatMul", accuracy_level)
    path = f"/model/layers.{len(layers)}/final_norm_layernorm"
    w_final = g.const(f"model.layers.{len(layers)}.final_norm_layernorm.weight", final_norm)
    (normed,) = g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, mlp_out, w_final],
        path,
        domain=MS,
        epsilon=spec.eps,
    )
    g.linear(normed, lm_head, "/lm_head/MatMul", accuracy_level, out="logits")
    inputs, outputs = _io(spec)
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="quant")


def _skip_norm(
    g: GraphWriter, residual: str, delta: str, weight: str, path: str, spec: DecoderSpec
) -> tuple[str, str]:
    """(norm(residual + delta), residual + delta) in one SkipSimplifiedLayerNormalization."""
    out, _, _, total = g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, weight],
        path,
        [f"{path}/output_0", "", "", f"{path}/output_3"],
        domain=MS,
        epsilon=spec.eps,
    )
    return out, total


def rotary_caches(rotary: nn.Module, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches ``(length, head_dim / 2)`` from the model's own rotary module."""
    positions = torch.arange(length).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    half = head_dim // 2
    return (
        cos[0, :, :half].float().contiguous().numpy(),
        sin[0, :, :half].float().contiguous().numpy(),
    )

"""Replace the ``quant_export::Quantize`` markers with the ONNX nodes each quantizer calls for.

Weights (the marker's input is an initializer) become stored codes plus DequantizeLinear:
INT8/FP8 per tensor or channel, INT4/INT8/FP8 block-wise with opset-21 blocked DequantizeLinear,
NVFP4 as FP4 codes with a two-level DequantizeLinear (E4M3 block scales times the global scale),
MXFP8 with TensorRT's ``TRT_MXFP8DequantizeLinear``. Activations become QuantizeLinear/
DequantizeLinear pairs (static: calibrated scale; dynamic per tensor: scale computed in the graph,
which onnxruntime fuses into integer MatMuls), dynamic per-token/per-block arithmetic, or
TensorRT's ``TRT_FP4DynamicQuantize`` / ``TRT_MXFP8DynamicQuantize`` for NVFP4 and MXFP8.
Codes and scales come from ``quant_kernels.quantize_to_codes``; nothing here re-implements numerics.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto

import quant_kernels as qk
from quant_core.nn.onnx_qdq import qdq_scale
from quant_export.quantizers import MARKER_DOMAIN, MARKER_OP, QuantizerSpec, UnsupportedFormatError

TRT_DOMAIN = "trt"

_E4M3 = qk.ElementFormat.parse((4, 3))
_TARGETS = ("onnxruntime", "tensorrt")


class _Names:
    """Unique tensor names under a quantizer's name."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def __call__(self, spec: QuantizerSpec, what: str) -> str:
        return f"{spec.name}.{what}_{next(self._count)}"


def _tensor(values: torch.Tensor, element: qk.ElementFormat | None, name: str) -> TensorProto:
    """An initializer holding ``values`` (codes of ``element``, or plain float/uint8 data)."""
    if element is None:
        array = values.detach().cpu().numpy()
        return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
    dims = list(values.shape)
    if element.packed_nibbles:
        pack = qk.pack_int4 if element.is_int else qk.pack_fp4
        raw = pack(values.reshape(-1)).view(torch.uint8)
    else:
        raw = values.contiguous().view(torch.uint8) if values.element_size() == 1 else values
    return onnx.helper.make_tensor(
        name, _onnx_type(element), dims, raw.cpu().numpy().tobytes(), raw=True
    )


def _onnx_type(element: qk.ElementFormat) -> int:
    """The ONNX TensorProto element type of ``element``'s codes (from the format table)."""
    return getattr(TensorProto, element.onnx_dtype)


def _const(tensor: TensorProto) -> gs.Constant:
    return gs.Constant(tensor.name, values=gs.ir.tensor.LazyValues(tensor))


def _scalar(name: str, value: float) -> gs.Constant:
    return gs.Constant(name, np.array(value, dtype=np.float32))


class Lowering:
    """Rewrites one imported graph's markers; ``target`` decides which non-standard ops are allowed."""

    def __init__(self, graph: gs.Graph, specs: list[QuantizerSpec], target: str):
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        self.graph, self.specs, self.target = graph, specs, target
        self.name = _Names()
        self.uses_fp4 = False
        self.uses_trt = False

    def run(self) -> None:
        """Lower every marker node in the graph."""
        markers = [n for n in self.graph.nodes if n.op == MARKER_OP and n.domain == MARKER_DOMAIN]
        for node in markers:
            spec = self.specs[node.attrs["index"]]
            x, y = node.inputs[0], node.outputs[0]
            node.inputs.clear()
            node.outputs.clear()
            if isinstance(x, gs.Constant):
                self._weight(spec, x, y)
            else:
                self._activation(spec, x, y)
        self.graph.cleanup().toposort()

    def _unsupported(self, spec: QuantizerSpec, why: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(
            f"layer {spec.name.rsplit('.', 1)[0] or spec.name}: quantizer {spec.name} with format "
            f"{spec.describe()} cannot be exported for target {self.target!r}: {why}"
        )

    # ----- weights ----------------------------------------------------------------------------
    def _weight(self, spec: QuantizerSpec, x: gs.Constant, y: gs.Variable) -> None:
        w = torch.from_numpy(np.array(x.values, dtype=np.float32))
        if spec.pre_quant_scale is not None:
            w = w * spec.pre_quant_scale
        if not spec.enabled:
            self._bind(y, _const(_tensor(w, None, self.name(spec, "weight"))))
            return
        element = spec.element
        if element.onnx_dtype is None:
            raise self._unsupported(spec, "ONNX has no element type for it")
        blocks = {a % w.dim(): (b or w.shape[a]) for a, b in spec.blocks.items()}
        qt = spec.codes(w, blocks)
        codes, scale = qt.codes, qt.scale
        axis, block = self._weight_layout(spec, w, scale, blocks)
        if block:
            scale = self._expand_other_blocks(scale, blocks, axis, w.shape)
        absorbed = self._absorb_transpose(y)
        if absorbed is not None:
            perm, y = absorbed
            codes = codes.permute(perm).contiguous()
            scale = scale.permute(perm).contiguous() if scale.dim() == w.dim() else scale
            axis = perm.index(axis) if axis is not None else None
        code_init = _const(_tensor(codes, element, self.name(spec, "codes")))
        if spec.format.scale_mode is qk.ScaleMode.E4M3:
            self._nvfp4_weight(spec, code_init, scale, qt.global_scale, axis, block, y)
        elif spec.format.scale_mode is qk.ScaleMode.E8M0:
            self._mxfp8_weight(spec, code_init, scale, axis, block, y)
        else:
            scale = scale.float() if block else scale.float().reshape(-1)
            scale_init = _const(
                _tensor(
                    scale if scale.numel() > 1 else scale.reshape(()),
                    None,
                    self.name(spec, "scale"),
                )
            )
            attrs = {} if scale.numel() == 1 else {"axis": axis}
            if block:
                attrs["block_size"] = block
            self.graph.layer(
                op="DequantizeLinear", inputs=[code_init, scale_init], outputs=[y], attrs=attrs
            )
        self.uses_fp4 |= element.onnx_dtype == "FLOAT4E2M1"

    def _weight_layout(
        self, spec: QuantizerSpec, w: torch.Tensor, scale: torch.Tensor, blocks: dict[int, int]
    ) -> tuple[int | None, int | None]:
        """(axis, block_size) of the DequantizeLinear: the blocked axis, or the per-channel axis."""
        if blocks:
            real = [a for a, b in blocks.items() if b < w.shape[a]]
            axis = max(real or blocks)
            return axis, min(blocks[axis], w.shape[axis])
        if scale.numel() == 1:
            return None, None
        kept = [a for a in range(w.dim()) if scale.shape[a] > 1] if scale.dim() == w.dim() else []
        if len(kept) != 1:
            raise self._unsupported(spec, f"scale of shape {tuple(scale.shape)} is not per-channel")
        return kept[0], None

    @staticmethod
    def _expand_other_blocks(
        scale: torch.Tensor, blocks: dict[int, int], axis: int, shape: torch.Size
    ) -> torch.Tensor:
        """Turn 2D blocks into 1D blocks along ``axis`` by repeating scales along the other axes."""
        for a, b in blocks.items():
            if a != axis and scale.shape[a] != shape[a]:
                scale = scale.repeat_interleave(b, dim=a).narrow(a, 0, shape[a])
        return scale

    def _absorb_transpose(self, y: gs.Variable) -> tuple[list[int], gs.Variable] | None:
        """If the weight's only consumer is a Transpose, remove it; returns (perm, its output)."""
        consumers = list(y.outputs)
        if len(consumers) != 1 or consumers[0].op != "Transpose" or y in self.graph.outputs:
            return None
        node = consumers[0]
        perm = list(node.attrs.get("perm", reversed(range(len(y.shape or [])))))
        if not perm:
            return None
        output = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        return perm, output

    def _nvfp4_weight(
        self,
        spec: QuantizerSpec,
        codes: gs.Constant,
        scale: torch.Tensor,
        global_scale: torch.Tensor,
        axis: int,
        block: int,
        y: gs.Variable,
    ) -> None:
        scale_init = _const(_tensor(scale, _E4M3, self.name(spec, "block_scale")))
        g = _scalar(self.name(spec, "global_scale"), float(global_scale))
        block_scale = self.graph.layer(
            op="DequantizeLinear", inputs=[scale_init, g], outputs=[self._var(spec, "scale")]
        )[0]
        self.graph.layer(
            op="DequantizeLinear",
            inputs=[codes, block_scale],
            outputs=[y],
            attrs={"axis": axis, "block_size": block},
        )

    def _mxfp8_weight(
        self,
        spec: QuantizerSpec,
        codes: gs.Constant,
        scale: torch.Tensor,
        axis: int,
        block: int,
        y: gs.Variable,
    ) -> None:
        if self.target != "tensorrt" or spec.element != _E4M3:
            raise self._unsupported(
                spec, "only MXFP8 has an MX form (TensorRT's TRT_MXFP8DequantizeLinear)"
            )
        scale_init = _const(_tensor(scale.view(torch.uint8), None, self.name(spec, "e8m0_scale")))
        self._trt(
            "TRT_MXFP8DequantizeLinear",
            [codes, scale_init],
            [y],
            axis=axis,
            block_size=block,
            output_dtype=TensorProto.FLOAT,
        )

    # ----- activations --------------------------------------------------------------------------
    def _activation(self, spec: QuantizerSpec, x: gs.Variable, y: gs.Variable) -> None:
        if spec.pre_quant_scale is not None:
            pqs = _const(_tensor(spec.pre_quant_scale, None, self.name(spec, "pre_quant_scale")))
            x = self.graph.layer(op="Mul", inputs=[x, pqs], outputs=[self._var(spec, "scaled")])[0]
        if not spec.enabled:
            self.graph.layer(op="Identity", inputs=[x], outputs=[y])
            return
        element = spec.element
        if spec.format.scale_mode is qk.ScaleMode.E4M3:
            return self._nvfp4_activation(spec, x, y)
        if spec.format.scale_mode is qk.ScaleMode.E8M0:
            return self._mxfp8_activation(spec, x, y)
        if element.onnx_dtype is None or element.packed_nibbles:
            raise self._unsupported(spec, "no QuantizeLinear form for this activation format")
        if spec.narrow_range and spec.element.is_int:
            raise self._unsupported(spec, "QuantizeLinear has no narrow (symmetric) integer range")
        if spec.blocks:
            return self._blocked_dynamic(spec, x, y)
        if spec.dynamic or spec.amax is None:
            scale = self._dynamic_scale(spec, x, spec.axis)
            attrs = {"axis": spec.axis} if spec.axis is not None else {}
        else:
            s = qdq_scale(spec.amax, spec.element).reshape(-1)
            scale = _const(
                _tensor(s if s.numel() > 1 else s.reshape(()), None, self.name(spec, "scale"))
            )
            attrs = {"axis": spec.axis} if s.numel() > 1 else {}
        zero = gs.Constant(
            self.name(spec, "zero_point"),
            values=gs.ir.tensor.LazyValues(
                onnx.helper.make_tensor("z", _onnx_type(element), [], [0])
            ),
        )
        q = self.graph.layer(
            op="QuantizeLinear",
            inputs=[x, scale, zero],
            outputs=[self._var(spec, "q")],
            attrs=attrs,
        )[0]
        self.graph.layer(op="DequantizeLinear", inputs=[q, scale, zero], outputs=[y], attrs=attrs)

    def _dynamic_scale(self, spec: QuantizerSpec, x: gs.Variable, axis: int | None) -> gs.Variable:
        """max|x| (per tensor, or per index of ``axis``) divided by the format's max, never 0."""
        absx = self.graph.layer(op="Abs", inputs=[x], outputs=[self._var(spec, "abs")])[0]
        if axis is None:
            amax = self.graph.layer(
                op="ReduceMax",
                inputs=[absx],
                outputs=[self._var(spec, "amax")],
                attrs={"keepdims": 0},
            )[0]
        else:
            rank = len(x.shape) if x.shape is not None else None
            if rank is None:
                raise self._unsupported(spec, "per-channel dynamic scale needs the input's rank")
            axes = gs.Constant(
                self.name(spec, "axes"),
                np.array([a for a in range(rank) if a != axis % rank], np.int64),
            )
            amax = self.graph.layer(
                op="ReduceMax",
                inputs=[absx, axes],
                outputs=[self._var(spec, "amax")],
                attrs={"keepdims": 0},
            )[0]
        return self._scale_from_amax(spec, amax)

    def _scale_from_amax(self, spec: QuantizerSpec, amax: gs.Variable) -> gs.Variable:
        """scale = max(amax / format max, smallest normal float32): never zero, so x / scale is finite."""
        bound = _scalar(self.name(spec, "format_max"), spec.element.max_value)
        scale = self.graph.layer(
            op="Div", inputs=[amax, bound], outputs=[self._var(spec, "scale")]
        )[0]
        tiny = _scalar(self.name(spec, "tiny"), np.finfo(np.float32).tiny)
        return self.graph.layer(op="Max", inputs=[scale, tiny], outputs=[self._var(spec, "scale")])[
            0
        ]

    def _blocked_dynamic(self, spec: QuantizerSpec, x: gs.Variable, y: gs.Variable) -> None:
        """Dynamic per-token / per-block quantization written as arithmetic (ONNX has no dynamic blocked Q)."""
        if len(spec.blocks) != 1 or not spec.dynamic:
            raise self._unsupported(
                spec, "only dynamic blocks along one axis have an activation form"
            )
        ((axis, block),) = spec.blocks.items()
        shape = list(x.shape or [])
        if block is None and axis == -1:
            xb = x  # one amax per row (per token): no reshape, so the last axis may be symbolic
        else:
            if not shape or not isinstance(shape[axis], int) or axis % len(shape) != len(shape) - 1:
                raise self._unsupported(
                    spec, "activation blocks must run along a last axis of known size"
                )
            block = block or shape[-1]
            if shape[-1] % block:
                raise self._unsupported(
                    spec, f"last axis {shape[-1]} is not a multiple of block {block}"
                )
            rank = len(shape)
            split = gs.Constant(
                self.name(spec, "shape"),
                np.array([0] * (rank - 1) + [shape[-1] // block, block], np.int64),
            )
            xb = self.graph.layer(
                op="Reshape", inputs=[x, split], outputs=[self._var(spec, "blocks")]
            )[0]
        absx = self.graph.layer(op="Abs", inputs=[xb], outputs=[self._var(spec, "abs")])[0]
        last = gs.Constant(self.name(spec, "last"), np.array([-1], np.int64))
        amax = self.graph.layer(
            op="ReduceMax",
            inputs=[absx, last],
            outputs=[self._var(spec, "amax")],
            attrs={"keepdims": 1},
        )[0]
        scale = self._scale_from_amax(spec, amax)
        scaled = self.graph.layer(
            op="Div", inputs=[xb, scale], outputs=[self._var(spec, "scaled")]
        )[0]
        if spec.element.is_int:
            lo, hi = spec.element.int_range(spec.narrow_range)
            r = self.graph.layer(op="Round", inputs=[scaled], outputs=[self._var(spec, "round")])[0]
            grid = self.graph.layer(
                op="Clip",
                inputs=[r, _scalar(self.name(spec, "lo"), lo), _scalar(self.name(spec, "hi"), hi)],
                outputs=[self._var(spec, "codes")],
            )[0]
        else:
            c = self.graph.layer(
                op="Cast",
                inputs=[scaled],
                outputs=[self._var(spec, "codes", _onnx_type(spec.element))],
                attrs={"to": _onnx_type(spec.element), "saturate": 1},
            )[0]
            grid = self.graph.layer(
                op="Cast",
                inputs=[c],
                outputs=[self._var(spec, "grid")],
                attrs={"to": TensorProto.FLOAT},
            )[0]
        if xb is x:
            self.graph.layer(op="Mul", inputs=[grid, scale], outputs=[y])
            return
        deq = self.graph.layer(
            op="Mul", inputs=[grid, scale], outputs=[self._var(spec, "dequant")]
        )[0]
        back = self.graph.layer(
            op="Shape", inputs=[x], outputs=[self._var(spec, "orig_shape", TensorProto.INT64)]
        )[0]
        self.graph.layer(op="Reshape", inputs=[deq, back], outputs=[y])

    def _nvfp4_activation(self, spec: QuantizerSpec, x: gs.Variable, y: gs.Variable) -> None:
        if self.target != "tensorrt":
            raise self._unsupported(
                spec,
                "NVFP4 activations need TensorRT's TRT_FP4DynamicQuantize "
                "(onnxruntime has no FP4 kernel); export with target='tensorrt'",
            )
        g_amax = spec.global_amax(None)
        if g_amax is None or len(spec.blocks) != 1:
            raise self._unsupported(
                spec, "NVFP4 activations need a calibrated global amax and one block axis"
            )
        ((axis, block),) = spec.blocks.items()
        g = _scalar(
            self.name(spec, "global_scale"),
            float(g_amax) / (spec.element.max_value * qk.E4M3_MAX) or 1.0,
        )
        xf4 = self._var(spec, "fp4", TensorProto.FLOAT4E2M1)
        sf8 = self._var(spec, "block_scale_e4m3", TensorProto.FLOAT8E4M3FN)
        self._trt(
            "TRT_FP4DynamicQuantize",
            [x, g],
            [xf4, sf8],
            axis=axis,
            block_size=block,
            scale_type=TensorProto.FLOAT8E4M3FN,
        )
        s = self.graph.layer(
            op="DequantizeLinear", inputs=[sf8, g], outputs=[self._var(spec, "block_scale")]
        )[0]
        self.graph.layer(
            op="DequantizeLinear",
            inputs=[xf4, s],
            outputs=[y],
            attrs={"axis": axis, "block_size": block},
        )
        self.uses_fp4 = True

    def _mxfp8_activation(self, spec: QuantizerSpec, x: gs.Variable, y: gs.Variable) -> None:
        if self.target != "tensorrt" or spec.element != _E4M3 or len(spec.blocks) != 1:
            raise self._unsupported(
                spec,
                "MX activations export only as MXFP8 with TensorRT's "
                "TRT_MXFP8DynamicQuantize (target='tensorrt')",
            )
        ((axis, block),) = spec.blocks.items()
        xf8 = self._var(spec, "fp8", TensorProto.FLOAT8E4M3FN)
        se8 = self._var(spec, "e8m0_scale", TensorProto.UINT8)
        self._trt(
            "TRT_MXFP8DynamicQuantize",
            [x],
            [xf8, se8],
            axis=axis,
            block_size=block,
            output_dtype=TensorProto.FLOAT8E4M3FN,
        )
        self._trt(
            "TRT_MXFP8DequantizeLinear",
            [xf8, se8],
            [y],
            axis=axis,
            block_size=block,
            output_dtype=TensorProto.FLOAT,
        )

    # ----- helpers ------------------------------------------------------------------------------
    def _trt(self, op: str, inputs: list, outputs: list, **attrs: int) -> None:
        self.uses_trt = True
        node = gs.Node(op=op, inputs=inputs, outputs=outputs, attrs=attrs, domain=TRT_DOMAIN)
        self.graph.nodes.append(node)

    def _var(self, spec: QuantizerSpec, what: str, dtype: int | None = None) -> gs.Variable:
        """A new intermediate tensor; its type is left to shape inference unless ``dtype`` is given."""
        return gs.Variable(self.name(spec, what), dtype=dtype)

    def _bind(self, y: gs.Variable, value: gs.Tensor) -> None:
        self.graph.layer(op="Identity", inputs=[value], outputs=[y])

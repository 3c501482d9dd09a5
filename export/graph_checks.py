"""Lints for exported graphs: static shapes, and op/type pairs TensorRT's parser documents.

Static shapes: no op whose output shape depends on tensor values.

Taint analysis over the ONNX graph: the *values* of graph inputs are data; ``Shape`` (and
``Size``) outputs, constants and initializers are not; every other op's outputs are data if
any input is. A graph is static-shaped when no shape-determining operand (a Reshape's shape,
a Slice's bounds, a Range's limits, a TopK's K, ...) is data, and when it has no op whose
output shape is data-dependent by definition (NonZero, Unique, Compress, loops, branches).
TensorRT then builds one engine per budget and CUDA graphs can capture it.
"""

from __future__ import annotations

import onnx

FORBIDDEN = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan", "NonMaxSuppression", "StringSplit"}
SHAPE_OPS = {"Shape", "Size"}
# op type -> input positions that determine an output shape
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "TopK": (1,), "OneHot": (1,), "Pad": (1, 3), "Split": (1,), "Resize": (2, 3),
    "Unsqueeze": (1,), "Squeeze": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "CumSum": (1,), "Upsample": (1,),
}


def data_dependent_shapes(model: onnx.ModelProto) -> list[str]:
    """Every place in ``model`` where a shape could depend on tensor values (empty: static)."""
    graph = model.graph
    data = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    problems = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type in FORBIDDEN:
            problems.append(f"{node.op_type} node '{node.name}' has a data-dependent output shape")
            continue
        for position in SHAPE_OPERANDS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in data:
                problems.append(f"{node.op_type} node '{node.name}': operand {position} ('{node.input[position]}') depends on tensor values")
        if node.op_type not in SHAPE_OPS and any(i in data for i in node.input):
            data.update(node.output)
    return problems


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# onnx-tensorrt's operator matrix (docs/operators.md, 10.x) lists these ops for float types only.
FLOAT_ONLY = {"CumSum", "Clip"}


def undocumented_types(model: onnx.ModelProto) -> list[str]:
    """Nodes whose first input has a type onnx-tensorrt's matrix does not document for the op."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    problems = []
    for node in graph.node:
        if node.op_type in FLOAT_ONLY and types.get(node.input[0]) not in FLOAT_TYPES:
            name = onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))
            problems.append(f"{node.op_type} node '{node.name}' on {name} (onnx-tensorrt documents float types only)")
    return problems

"""CPU implementations of the plugin ops for ONNX Runtime, so plugin-mode artifacts validate in CI.

ONNX Runtime cannot run ``trt.plugins::VisionDropSelect`` / ``VisionDropMerge`` nodes as they
are. The ops are registered as onnxruntime-extensions Python ops whose bodies are the
reference math of ``visiondrop_edge.pruning`` (the same functions the CUDA kernels are checked
against). Python ops live in the extensions' own domain and take fp32 only, so
:func:`ort_model` rewrites a plugin graph in memory for ONNX Runtime: node domain to the
extensions' domain, and fp16/bf16 token tensors cast to fp32 and back around the node
(exact: select only gathers, merge computes in fp32 and rounds once at the end, as the
kernels do). The artifact on disk keeps the TensorRT form.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from visiondrop_edge import pruning

from . import MERGE_OP, PLUGIN_DOMAIN, SELECT_OP, is_plugin_node

# Which inputs/outputs of each op carry tokens (the activation dtype); the rest are fp32 / int32.
TOKEN_INPUTS = {SELECT_OP: (1,), MERGE_OP: (0,)}
TOKEN_OUTPUTS = {SELECT_OP: (0, 1), MERGE_OP: (0,)}


def _register() -> str:
    """Register the Python ops once; returns the custom-op library to load into a session."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f32, i32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int64

    @onnx_op(op_type=SELECT_OP, inputs=[f32, f32, f32], outputs=[f32, f32, f32, i32, i32], attrs={"k": i64})
    def select_op(scores, tokens, metric, k):
        chosen = pruning.select(torch.from_numpy(scores), torch.from_numpy(tokens), torch.from_numpy(metric), int(k))
        return (chosen.dominant.numpy(), chosen.rest_tokens.numpy(), chosen.rest_metric.numpy(),
                chosen.kept_index.numpy().astype(np.int32), chosen.rest_index.numpy().astype(np.int32))

    @onnx_op(op_type=MERGE_OP, inputs=[f32, f32], outputs=[f32, i32], attrs={"c": i64})
    def merge_op(rest_tokens, rest_metric, c):
        merged = pruning.merge(torch.from_numpy(rest_tokens), torch.from_numpy(rest_metric), int(c))
        return merged.tokens.numpy(), merged.assignment.numpy().astype(np.int32)

    return get_library_path()


_LIBRARY: str | None = None


def custom_ops_library() -> str:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = _register()
    return _LIBRARY


def ort_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite a plugin-mode graph (in place) so ONNX Runtime runs it with the Python ops.

    The token dtype of each node is read from the traced type of its first output, which
    export records in the graph's value_info (ONNX shape inference cannot type custom ops).
    """
    from onnxruntime_extensions import default_opset_domain

    domain = default_opset_domain()
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    nodes = []
    for node in model.graph.node:
        if not is_plugin_node(node):
            nodes.append(node)
            continue
        node.domain = domain
        token_dtype = types[node.output[0]]
        cast = token_dtype != onnx.TensorProto.FLOAT
        for index in TOKEN_INPUTS[node.op_type] if cast else ():
            name = node.input[index]
            nodes.append(helper.make_node("Cast", [name], [f"{name}__in_fp32"], to=onnx.TensorProto.FLOAT))
            node.input[index] = f"{name}__in_fp32"
        nodes.append(node)
        for index in TOKEN_OUTPUTS[node.op_type] if cast else ():
            name = node.output[index]
            node.output[index] = f"{name}__out_fp32"
            nodes.append(helper.make_node("Cast", [f"{name}__out_fp32"], [name], to=token_dtype))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    for opset in model.opset_import:
        if opset.domain == PLUGIN_DOMAIN:
            opset.domain = domain
    return model

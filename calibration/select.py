"""Which nodes of a graph get Q/DQ, and which stay float (with the reason, for the manifest).

Only linear layers are quantized: MatMul/Gemm/Conv nodes whose weight is a constant. That
leaves in float, by construction, every activation-by-activation product (attention scores
and probabilities times values), Softmax, the norms, RoPE, the KV cache and everything of the
prunes. The vision graph also holds the stage-0 prune, and it is found by dataflow rather than
by name. It is every node downstream of the last CLIP layer's q/k projections (the weighted
linears that feed ``scores``) that feeds the stage outputs (scores, kept/target indices), and
every node downstream of those that feeds the projector's first linear layer. That is the
scoring, the select and the merge, plugin nodes included. The last layer's own attention and
MLP do not depend on the scores, so they are not in it. Every linear layer that a prune's
scores depend on inside a graph stays float as well: in the vision graph, the patch embedding
and the tower up to the last layer's q/k. Quantizing them moved the tiny model's stage-0 scores
to cosine 0.94, and they are a small share of a 7B VLM's bytes (Edge-LLM keeps an FP16 ViT).
In a decoder group that feeds an LLM prune, the projections of its ``next_query``/``next_key``
(the q/k that the prune scores with; v reads the same input, so it comes along) stay float.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
STAGE_OUTPUTS = ("scores", "kept_index", "target_index")
SHAPE_ONLY = ("Shape", "Size")

FLOAT_CLASSES = [
    {"nodes": "attention MatMuls (activation x activation: q.k^T, probabilities.v)",
     "reason": "both operands are activations; TensorRT fuses attention in the float dtype (FP8 attention is a later option)"},
    {"nodes": "Softmax",
     "reason": "ONNX Runtime's QDQ Softmax output stays asymmetric (TensorRT rejects non-zero zero points)"},
    {"nodes": "LayerNormalization / RMSNorm, RoPE, residual adds, activations",
     "reason": "norms and elementwise ops are cheap and precision-sensitive; Q/DQ sits only on linear-layer inputs"},
    {"nodes": "KV cache (past_key_values.* / new_key_values.*)",
     "reason": "the cache stays in the export dtype (an INT8/FP8 cache is a later option)"},
    {"nodes": "embed_tokens.safetensors",
     "reason": "a table lookup run by the runtime, not a graph"},
]


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}


def weighted_linears(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul/Gemm/Conv nodes whose second input (the weight) is a constant: the linear layers."""
    constants = _constants(model.graph)
    return [n for n in model.graph.node if n.op_type in LINEAR_OPS and len(n.input) > 1 and n.input[1] in constants]


def nearest_linears(model: onnx.ModelProto, tensors: list[str]) -> list[onnx.NodeProto]:
    """The linear layers that produce ``tensors``: the first met on each path upstream of them."""
    producers = _producers(model.graph)
    linear = {id(n) for n in weighted_linears(model)}
    frontier, seen, found = list(tensors), set(), []
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if id(node) in linear:
            found.append(node)
        elif node.op_type not in SHAPE_ONLY:  # a shape query depends on no value upstream
            frontier.extend(node.input)
    return found


def lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The linear layer that produces ``logits`` (last decoder group only)."""
    if not any(o.name == "logits" for o in model.graph.output):
        return None
    return next(iter(nearest_linears(model, ["logits"])), None)


def _ancestors(graph: onnx.GraphProto, tensors: list[str], stop: set[str]) -> set[str]:
    """Nodes whose values reach ``tensors`` (their producers included), not crossing ``stop`` nodes."""
    producers = _producers(graph)
    found: set[str] = set()
    frontier = list(tensors)
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in found or node.name in stop:
            continue
        found.add(node.name)
        if node.op_type not in SHAPE_ONLY:  # a shape query depends on no value upstream
            frontier.extend(node.input)
    return found


def _descendants(graph: onnx.GraphProto, nodes: set[str]) -> set[str]:
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    by_name = {n.name: n for n in graph.node}
    found: set[str] = set()
    frontier = [o for name in nodes for o in by_name[name].output]
    while frontier:
        for node in consumers[frontier.pop()]:
            if node.name not in found:
                found.add(node.name)
                frontier.extend(node.output)
    return found


def vision_prune_nodes(model: onnx.ModelProto) -> list[str]:
    """The stage-0 prune's nodes in the vision graph (empty for ``--budget full``), in graph order."""
    graph = model.graph
    outputs = [o.name for o in graph.output if o.name in STAGE_OUTPUTS]
    if not outputs:
        return []
    producers = _producers(graph)
    linears = [n.name for n in weighted_linears(model)]
    decisions = {producers[name].name for name in outputs}
    decided = _descendants(graph, decisions) | decisions  # everything that depends on the scores
    projector = next(name for name in linears if name in decided)  # the first linear fed by the prune
    tower_linears = [name for name in linears if name not in decided]
    tower = _ancestors(graph, [o for n in graph.node if n.name in tower_linears for o in n.output], stop=set())
    layer_end = _descendants(graph, {tower_linears[-1]}) - decided  # the last MLP linear's bias and residual adds
    into_projector = _ancestors(graph, [next(n for n in graph.node if n.name == projector).input[0]], stop=set())
    region = (_ancestors(graph, outputs, stop=set()) | into_projector) - tower - layer_end
    return [n.name for n in graph.node if n.name in region]


def scoring_linears(model: onnx.ModelProto, role: str, index: int) -> list[str]:
    """The linear layers a prune's scores depend on within this graph: they stay float.

    Vision: every linear upstream of ``scores`` (patch embedding, the tower up to the last
    layer's q/k). A decoder group but the last: the q/k projections of its ``next_*``
    outputs, which ``prune_{index}`` scores with; the group's own layers are quantized, as
    in every other decoder group (``qkv_0`` feeds no prune). Linears reading the same input
    (v) come along.
    """
    outputs = {o.name for o in model.graph.output}
    if role == "vision" and "scores" in outputs:
        upstream = _ancestors(model.graph, ["scores"], stop=set())
    elif role == "decoder" and {"next_query", "next_key"} <= outputs:
        upstream = {n.name for n in nearest_linears(model, ["next_query", "next_key"])}
    else:
        return []
    linears = weighted_linears(model)
    # ORT's QDQ routes every consumer of a quantized tensor through its DequantizeLinear, so
    # a linear that shares its input with a float one (v beside q/k) must stay float too.
    shared = {n.input[0] for n in linears if n.name in upstream}
    return [n.name for n in linears if n.name in upstream or n.input[0] in shared]

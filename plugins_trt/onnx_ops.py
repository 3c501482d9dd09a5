"""Plugin-mode export: the select and merge ops traced as single TensorRT plugin nodes.

Each op is an autograd Function whose forward is the reference math in
``visiondrop_edge.pruning`` (so tracing computes real values) and whose ONNX symbolic is one node
that TensorRT's parser maps to the plugin: ``op_type`` = plugin name, ``domain`` =
"trt.plugins", ``plugin_namespace`` = "visiondrop", ``plugin_version`` = "1", integer attributes.
Indices leave the plugin as int32 (what every TensorRT 10.x plugin can emit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from visiondrop_edge import pruning

from . import MERGE_OP, PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, SELECT_OP


def _plugin_node(g, op: str, *inputs, count: int, **count_attribute):
    """One plugin node, its outputs typed by the plugin's shape rule (so the tracer's shape
    inference knows them)."""
    attributes = {f"{name}_i": value for name, value in count_attribute.items()}
    types = OUTPUT_TYPES[op]
    outputs = g.op(
        f"{PLUGIN_DOMAIN}::{op}", *inputs, outputs=len(types),
        plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=PLUGIN_NAMESPACE, **attributes,
    )
    shapes = plugin_output_shapes(op, count, [value.type().varyingSizes() for value in inputs])
    for output, source, shape in zip(outputs, types, shapes, strict=True):
        like = inputs[0].type().with_dtype(torch.int32) if source == INT32 else inputs[source].type()
        output.setType(like.with_sizes(shape))
    return outputs


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, tokens: Tensor, metric: Tensor, k: int):
        chosen = pruning.select(scores, tokens, metric, k)
        return chosen.dominant, chosen.rest_tokens, chosen.rest_metric, chosen.kept_index.int(), chosen.rest_index.int()

    @staticmethod
    def symbolic(g, scores, tokens, metric, k):
        return _plugin_node(g, SELECT_OP, scores, tokens, metric, count=k, k=k)


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rest_tokens: Tensor, rest_metric: Tensor, c: int):
        merged = pruning.merge(rest_tokens, rest_metric, c)
        return merged.tokens, merged.assignment.int()

    @staticmethod
    def symbolic(g, rest_tokens, rest_metric, c):
        return _plugin_node(g, MERGE_OP, rest_tokens, rest_metric, count=c, c=c)


def plugin_select(scores: Tensor, tokens: Tensor, metric: Tensor, k: int) -> pruning.Selection:
    return pruning.Selection(*_Select.apply(scores, tokens, metric, k))


def plugin_merge(rest_tokens: Tensor, rest_metric: Tensor, c: int) -> pruning.Merged:
    return pruning.Merged(*_Merge.apply(rest_tokens, rest_metric, c))


PLUGIN_OPS = (plugin_select, plugin_merge)



INT32 = "int32"
# Each plugin output's element type: the same as that input's, or int32 (the index outputs).
OUTPUT_TYPES = {SELECT_OP: (1, 1, 2, INT32, INT32), MERGE_OP: (0, INT32)}


def plugin_output_shapes(op_type: str, count: int, inputs: list[list]) -> list[list]:
    """Each output's shape from the input shapes and the count attribute (``k`` or ``c``): the
    rule the C++ plugins' ``getOutputShapes`` implements, for the exporters and shape inference
    (neither can know a custom op). Other dimensions pass through as whatever they are; an
    unknown (None) token count leaves the rest count unknown."""
    if op_type == SELECT_OP:
        (batch, tokens), (_, _, width), (_, _, metric) = inputs
        rest = None if tokens is None else tokens - count
        return [[batch, count, width], [batch, rest, width], [batch, rest, metric], [batch, count], [batch, rest]]
    if op_type == MERGE_OP:
        (batch, rest, width), _ = inputs
        return [[batch, count, width], [batch, None if rest is None else rest - count]]
    raise ValueError(f"{op_type} is not a VisionDrop plugin op")

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


def _plugin_node(g, op: str, *inputs, outputs: int, **int_attributes):
    attributes = {f"{name}_i": value for name, value in int_attributes.items()}
    return g.op(
        f"{PLUGIN_DOMAIN}::{op}", *inputs, outputs=outputs,
        plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=PLUGIN_NAMESPACE, **attributes,
    )


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, tokens: Tensor, metric: Tensor, k: int):
        chosen = pruning.select(scores, tokens, metric, k)
        return chosen.dominant, chosen.rest_tokens, chosen.rest_metric, chosen.kept_index.int(), chosen.rest_index.int()

    @staticmethod
    def symbolic(g, scores, tokens, metric, k):
        return _plugin_node(g, SELECT_OP, scores, tokens, metric, outputs=5, k=k)


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rest_tokens: Tensor, rest_metric: Tensor, c: int):
        merged = pruning.merge(rest_tokens, rest_metric, c)
        return merged.tokens, merged.assignment.int()

    @staticmethod
    def symbolic(g, rest_tokens, rest_metric, c):
        return _plugin_node(g, MERGE_OP, rest_tokens, rest_metric, outputs=2, c=c)


def plugin_select(scores: Tensor, tokens: Tensor, metric: Tensor, k: int) -> pruning.Selection:
    return pruning.Selection(*_Select.apply(scores, tokens, metric, k))


def plugin_merge(rest_tokens: Tensor, rest_metric: Tensor, c: int) -> pruning.Merged:
    return pruning.Merged(*_Merge.apply(rest_tokens, rest_metric, c))


PLUGIN_OPS = (plugin_select, plugin_merge)

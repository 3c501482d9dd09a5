"""Each pipeline unit's I/O, written once: tensor names, their dynamic axes, typed results.

The exporter names graph inputs and outputs from here, the manifest records them, and every
backend binds tensors by these names (ONNX Runtime feeds and fetches, TensorRT binds
addresses, PyTorch builds the same typed results), so no unit's I/O is spelled twice and
nothing is bound by position. The cache inputs follow Optimum (``past_key_values.{i}.key``);
a decoder graph outputs only the new tokens' keys and values (``new_key_values.{i}.key``,
not Optimum's ``present`` = past + new, whose concatenation copies the whole cache every
step): the runtime writes them into its own cache buffers. Every decoder graph but the last
also outputs the next group's first-layer q/k/v (``next_query``...), so a decode step calls
``qkv_0`` then one graph per group, and a prefill hands those projections to the prune
between the groups. Shapes are ``[batch_size, ...]``;
every visual-token count is a constant of the schedule, so only batch and sequence lengths
are dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

from torch import Tensor

from .pruning import Choice
from .schedule import Schedule

# Symbolic axis names (the manifest and TensorRT profiles use them too).
BATCH, SEQ, PAST, TOTAL, PRUNED = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length", "pruned_sequence_length"


@dataclass
class StageTrace:
    """What one prune stage chose, in that stage's input numbering (the stage outputs of the
    vision and prune graphs)."""

    kept_index: Tensor  # [B, k]
    target_index: Tensor  # [B, c]
    scores: Tensor  # [B, N]
    assignment: Tensor  # [B, R - c]: each member's contextual slot (see visiondrop_edge.pruning.merge)
    merge_metric: Tensor  # [B, N, M]: the merge metric before normalisation

    @property
    def choice(self) -> Choice:
        return Choice(self.kept_index, self.assignment)

    def row(self, index: int) -> StageTrace:
        """Sample ``index`` alone (batch 1)."""
        return StageTrace(*(getattr(self, f.name)[index:index + 1] for f in fields(self)))


STAGE_OUTPUTS: tuple[str, ...] = tuple(f.name for f in fields(StageTrace))


class QKV(NamedTuple):
    """A decoder group's first-layer q/k/v before RoPE, [B, H(kv), S, hd] each: group 0's from
    ``qkv_0``, group g's from ``decoder_{g-1}`` (its ``next_*`` outputs)."""

    query: Tensor
    key: Tensor
    value: Tensor


class PruneOutputs(NamedTuple):
    """``prune_{s}``: the pruned sequence and the next layer's q/k/v for it, then the stage's choices."""

    pruned_hidden_states: Tensor
    pruned_query: Tensor
    pruned_key: Tensor
    pruned_value: Tensor
    pruned_attention_mask: Tensor
    pruned_position_ids: Tensor
    kept_index: Tensor
    target_index: Tensor
    scores: Tensor
    assignment: Tensor
    merge_metric: Tensor

    @property
    def stage(self) -> StageTrace:
        return StageTrace(*(getattr(self, name) for name in STAGE_OUTPUTS))


VISION_INPUTS = ("pixel_values",)
QKV_INPUTS = ("hidden_states",)
QKV_OUTPUTS = QKV._fields
PRUNE_INPUTS = ("hidden_states", "query", "key", "value", "attention_mask", "image_offset")
PRUNE_OUTPUTS = PruneOutputs._fields
DECODER_INPUTS = ("hidden_states", "query", "key", "value", "attention_mask", "position_ids")  # then past_key_values.*
NEXT_QKV = tuple(f"next_{name}" for name in QKV._fields)  # decoder_{g} -> group g + 1's first-layer q/k/v
PAST_KV, NEW_KV = "past_key_values", "new_key_values"  # the cache in; the new tokens' keys/values out


def vision_outputs(prunes: bool) -> tuple[str, ...]:
    """``vision_encoder``: the image embeddings, and the stage-0 choices when it prunes."""
    return ("image_embeds", *STAGE_OUTPUTS) if prunes else ("image_embeds",)


VISION_ENCODER = "vision_encoder"  # the tower, stage-0 prune and projector: one view per batch row


def layout_graph(schedule: Schedule) -> str:
    """A multi-crop image's layout graph for its grid class (``vision_layout_2x2``): the views'
    ``vision_encoder`` outputs -> the image's (weightless, so the tower is stored once)."""
    return f"vision_layout_{schedule.grid.describe()}"


def layout_inputs(prunes: bool) -> tuple[str, ...]:
    """A layout graph's inputs: the views' vision outputs, ``[batch_size, views, ...]``."""
    return tuple(f"view_{name}" for name in vision_outputs(prunes))


def prune_graph(schedule: Schedule, stage: int) -> str:
    """LLM stage ``stage``'s graph: ``prune_{stage}``; a multi-crop image's block-scope stages
    prune a block whose size is its views' count, one graph each (``prune_0_5views``)."""
    if schedule.grid is None or schedule.scope != "block":
        return f"prune_{stage}"
    return f"prune_{stage}_{schedule.views}views"


def kv_names(prefix: str, layers: range) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for each layer, in that order."""
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]


def decoder_inputs(layers: range) -> tuple[str, ...]:
    return (*DECODER_INPUTS, *kv_names(PAST_KV, layers))


def decoder_outputs(layers: range, last: bool) -> tuple[str, ...]:
    """The group's hidden states and the next group's first-layer q/k/v (the last group: the
    LM head's logits at the last position), then each layer's key (after RoPE) and value of
    the new tokens only."""
    head = ("logits",) if last else ("hidden_states_out", *NEXT_QKV)
    return (*head, *kv_names(NEW_KV, layers))


def dynamic_axes(unit: str, names: tuple[str, ...] | list[str]) -> dict[str, dict[int, str]]:
    """The dynamic axes of ``names`` in a ``unit`` ("vision", "layout", "qkv", "prune" or "decoder")."""
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        if unit in ("vision", "layout") or name in STAGE_OUTPUTS or name == "image_offset" or name == "logits":
            axes[name] = {0: BATCH}
        elif name.startswith("pruned_"):
            axes[name] = {0: BATCH, 2 if name in ("pruned_query", "pruned_key", "pruned_value") else 1: PRUNED}
        elif name.startswith(f"{PAST_KV}."):
            axes[name] = {0: BATCH, 2: PAST}
        elif name in ("query", "key", "value") or name in NEXT_QKV or name.startswith(f"{NEW_KV}."):
            axes[name] = {0: BATCH, 2: SEQ}
        elif name == "attention_mask":
            axes[name] = {0: BATCH, 1: TOTAL if unit == "decoder" else SEQ}
        else:  # hidden_states, hidden_states_out, position_ids
            axes[name] = {0: BATCH, 1: SEQ}
    return axes


def bind(names: tuple[str, ...] | list[str], tensors: tuple | list) -> dict[str, Tensor]:
    """Name a unit's positional results (a traced module's tuple): the counts must agree."""
    if len(names) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for the {len(names)} names {list(names)}")
    return dict(zip(names, tensors))

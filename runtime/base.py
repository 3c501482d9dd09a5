"""The backend interface: vision encode, prefill, decode step.

A backend only says how to run the units (vision, embedding, the first layer's QKV
projection, LLM prune, decoder group); the orchestration between them (splicing the image into the
prompt, per-group caches and masks, renumbered positions, the decode position rule) is
written once here, on torch tensors, so PyTorch, ONNX Runtime and TensorRT backends run the
exact same control flow. Nothing here leaves the device or syncs with the host.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop_edge.contract import (NEW_KV, NEXT_QKV, QKV, STAGE_OUTPUTS, VISION_ENCODER, PruneOutputs, StageTrace, kv_names, layout_graph,
                                      prune_graph, vision_outputs)
from visiondrop_edge.errors import InputError
from visiondrop_edge.manifest import ModelSpec
from visiondrop_edge.modules import positions_from_mask
from visiondrop_edge.pruning import splice
from visiondrop_edge.schedule import CropGrid

from .static_prefill import GraphedCalls

__all__ = ["Backend", "CacheFill", "DecoderState", "DelegatingBackend", "GraphBackend", "ModelSpec", "PrefillOutput", "StageTrace", "VisionOutput"]

CACHE_BLOCK = 64  # cache buffers grow by whole blocks of this many tokens: a step reads at most a block of
# empty slots, and a cache is copied once per block of decoding


@dataclass
class VisionOutput:
    image_embeds: Tensor  # [B, V0, D_llm]
    stage: StageTrace | None = None


@dataclass
class CacheFill:
    """How many slots of a group's cache buffers some state has filled: shared by every state
    that uses those buffers, so only the state that filled them last writes on in place."""

    length: int


@dataclass
class DecoderState:
    """Per-group KV caches (``[k0, v0, k1, v1, ...]``) and attention masks; lengths differ by group.

    ``masks[g]`` [B, L] covers the group's L filled positions; ``caches[g]`` are [B, H_kv, C, hd]
    buffers with C >= L (their first L slots are this state's, the rest is room to grow).
    ``fills`` (None for a state built elsewhere, e.g. by prefill or by stacking rows) says
    whether this state may write into that room (see :meth:`Backend.extend`).
    """

    caches: list[list[Tensor]] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    fills: list[CacheFill] | None = None


@dataclass
class PrefillOutput:
    logits: Tensor  # [B, vocab] at the last prompt position
    state: DecoderState
    stages: list[StageTrace]  # the LLM stages, in order


def describe_grid(schedule) -> str:
    """A schedule's crop grid as a person reads it: ``2x2``; unpruned with its unpadded patch grid."""
    grid = schedule.grid
    return grid.describe() + (f" ({grid.unpadded[0]}x{grid.unpadded[1]} patches unpadded)" if grid.unpadded else "")


class Backend(ABC):
    """Runs the exported units; subclasses provide the ``run_*`` methods."""

    name: str = "backend"
    spec: ModelSpec
    device: torch.device
    graphs: frozenset[str] | None = None  # the exported graphs it runs, by name (None: it builds its units itself)

    # ------------------------------------------------------------------ units
    @abstractmethod
    def run_vision(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """-> ``image_embeds`` (+ the :class:`StageTrace` fields when the schedule prunes), by name."""

    @abstractmethod
    def run_embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [B, S, D]."""

    @abstractmethod
    def run_qkv(self, hidden_states: Tensor) -> QKV:
        """q, k and v (before RoPE) of the first decoder layer (group 0's; the other groups'
        come out of the group before)."""

    @abstractmethod
    def run_prune(
        self, stage: int, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Tensor, image_offset: Tensor,
    ) -> PruneOutputs:
        """LLM stage ``stage``: the pruned sequence, its q/k/v, mask and positions, and the stage's choices."""

    @abstractmethod
    def run_group(
        self, group: int, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Tensor, position_ids: Tensor, past: list[Tensor],
    ) -> tuple[Tensor, QKV | None, list[Tensor]]:
        """-> hidden states (logits for the last group), the next group's first-layer q/k/v
        (None for the last group), and the new tokens' keys and values."""

    def cache_capacity(self, group: int, length: int) -> int:
        """Slots to allocate for a cache that must hold ``length`` tokens: whole blocks of
        :data:`CACHE_BLOCK`, so a buffer is copied once per block of decoding, not per step,
        and decode shapes change once per block (a CUDA graph per size)."""
        return -(-length // CACHE_BLOCK) * CACHE_BLOCK

    # ------------------------------------------------------------- crop grids
    def for_grid(self, grid: CropGrid | None) -> Backend:
        """This backend for images cut into ``grid`` (a multi-crop family; None: one view each):
        the same units, run on that grid's schedule (its vision and prune graphs)."""
        spec = self.spec.for_grid(grid)
        if spec == self.spec:
            return self
        if self.graphs is not None and layout_graph(spec.schedule) not in self.graphs:
            exported = ", ".join(describe_grid(plan) for plan in self.spec.graph_schedules())
            raise InputError(f"these graphs have no shapes for an image cut into {describe_grid(spec.schedule)} (they hold: "
                             f"{exported}){'; unpruned graphs hold one image size: run others on the PyTorch backend' if spec.schedule.is_full else ''}")
        bound = copy.copy(self)
        bound.spec = spec
        return bound

    def for_images(self, sizes: Sequence[tuple[int, int]]) -> Backend:
        """This backend for a batch of images of ``sizes`` (height, width as the processor sees
        them): a multi-crop model's static shapes are its grid's, so the batch must share one."""
        bound = [self.for_grid(self.spec.crop_grid(tuple(size))) for size in sizes]
        schedules = list(dict.fromkeys(b.spec.schedule for b in bound))
        if len(schedules) > 1:
            grids = ", ".join(f"image {i + 1}: {describe_grid(b.spec.schedule)}" for i, b in enumerate(bound))
            raise InputError(f"the images of one batch must share one crop grid ({grids}): run them in separate batches")
        return bound[0] if bound else self

    # ---------------------------------------------------------- orchestration
    replays: GraphedCalls | None = None  # set: vision encodes and prefills replay CUDA graphs (:mod:`.static_prefill`)

    @property
    def num_groups(self) -> int:
        return len(self.spec.schedule.layer_groups())

    def encode_image(self, pixel_values: Tensor) -> VisionOutput:
        """The vision unit on ``pixel_values``; with :attr:`replays`, a recorded call's replay."""
        pixel_values = pixel_values.to(self.device)
        if self.replays is None:
            return self._encode_image(pixel_values)
        return self.replays("vision", self.spec.schedule, self._encode_image, pixel_values)

    def _encode_image(self, pixel_values: Tensor) -> VisionOutput:
        outputs = self.run_vision(pixel_values)
        stage = None if self.spec.schedule.is_full else StageTrace(**{name: outputs[name] for name in STAGE_OUTPUTS})
        return VisionOutput(outputs["image_embeds"], stage)

    def empty_past(self, group: int, batch: int) -> list[Tensor]:
        start, stop = self.spec.schedule.layer_groups()[group]
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [torch.zeros(shape, dtype=self.spec.torch_dtype, device=self.device) for _ in range(2 * (stop - start))]

    def prefill(self, input_ids: Tensor, image_embeds: Tensor, attention_mask: Tensor, image_offset: Tensor) -> PrefillOutput:
        """Run the prompt (with ``image_tokens`` placeholders at ``image_offset``) through the
        decoder; with :attr:`replays`, a recorded call's replay."""
        inputs = [t.to(self.device) for t in (input_ids, image_embeds, attention_mask, image_offset)]
        if self.replays is None:
            return self._prefill(*inputs)
        return self.replays("prefill", self.spec.schedule, self._prefill, *inputs)

    def _prefill(self, input_ids: Tensor, image_embeds: Tensor, attention_mask: Tensor, image_offset: Tensor) -> PrefillOutput:
        embeds = self.run_embed(input_ids)
        hidden = splice(embeds, image_offset, image_embeds.shape[1], image_embeds.to(embeds.dtype))
        mask = attention_mask
        position_ids = positions_from_mask(mask)
        state, stages = DecoderState(), []
        query, key, value = self.run_qkv(hidden)
        for group in range(self.num_groups):
            if group > 0:
                pruned = self.run_prune(group - 1, hidden, query, key, value, mask, image_offset)
                hidden, query, key, value = pruned.pruned_hidden_states, pruned.pruned_query, pruned.pruned_key, pruned.pruned_value
                mask, position_ids = pruned.pruned_attention_mask, pruned.pruned_position_ids
                stages.append(pruned.stage)
            hidden, next_qkv, presents = self.run_group(
                group, hidden, query, key, value, mask, position_ids, self.empty_past(group, hidden.shape[0])
            )
            state.caches.append(presents)
            state.masks.append(mask)
            if next_qkv is not None:
                query, key, value = next_qkv
        return PrefillOutput(hidden, state, stages)

    def decode_step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """One greedy step for ``tokens`` [B]: a group's new position is its cache's real length."""
        tokens = tokens.to(self.device).unsqueeze(-1)
        return self.extend(tokens, torch.ones_like(tokens), state)

    def extend(self, input_ids: Tensor, attention_mask: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """Append text ``input_ids`` [B, S] (``attention_mask`` 0 on their left padding) to every
        group's cache; returns the last position's logits and the new state (``state`` is left
        as it was). Positions continue from each group's real cache length: pruning is a
        prefill matter, so this is a decode step of S tokens (prefix reuse, chat turns).

        The graphs read each cache buffer whole (its unfilled slots masked out) and return only
        the new tokens' keys and values, which are written into the buffer's room in place: a
        step copies S tokens per layer, not the cache. Every group's mask and positions are
        made before the first graph runs and the new keys and values written after the last,
        so the unit calls follow each other with only their feeds in between (host work right
        after a unit call runs on caches the call's weights have flushed: measured on 2 CPU
        cores, it cost several times its warm time).
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.run_embed(input_ids)
        length = attention_mask.shape[1]
        new_positions, new_mask = positions_from_mask(attention_mask), attention_mask.to(state.masks[0].dtype)
        steps = [self._step_inputs(state, group, new_mask, new_positions) for group in range(self.num_groups)]
        qkv, new_key_values = self.run_qkv(hidden), []
        for group, (buffers, _, mask, position_ids) in enumerate(steps):
            hidden, qkv, news = self.run_group(group, hidden, *qkv, mask, position_ids, buffers)
            new_key_values.append(news)
        new_state = DecoderState(fills=[])
        for (buffers, fill, _, _), news, past_mask in zip(steps, new_key_values, state.masks, strict=True):
            filled = past_mask.shape[1]
            for buffer, new in zip(buffers, news, strict=True):
                buffer[:, :, filled:filled + length] = new
            fill.length = filled + length
            new_state.caches.append(buffers)
            new_state.masks.append(torch.cat([past_mask, new_mask], dim=1))
            new_state.fills.append(fill)
        return hidden, new_state

    def _step_inputs(self, state: DecoderState, group: int, new_mask: Tensor, new_positions: Tensor):
        """``group``'s cache buffers and fill (:meth:`_room`), the step's attention mask (over
        those buffers, then the new tokens) and the new tokens' positions."""
        past_mask = state.masks[group]
        buffers, fill = self._room(state, group, new_mask.shape[1])
        room = past_mask.new_zeros(past_mask.shape[0], buffers[0].shape[2] - past_mask.shape[1])
        return buffers, fill, torch.cat([past_mask, room, new_mask], dim=1), past_mask.sum(-1, keepdim=True) + new_positions

    def _room(self, state: DecoderState, group: int, length: int) -> tuple[list[Tensor], CacheFill]:
        """``group``'s cache buffers with room for ``length`` more tokens after ``state``'s, and their fill.

        ``state`` writes in place only where no other state has written: when its buffers'
        fill is its own length (it is the newest state on them). Otherwise (a prefix answered
        again, an older state extended twice, a state from prefill or from stacked rows, or no
        room left) its filled part is copied once into new buffers of whole blocks.
        """
        past, filled = state.caches[group], state.masks[group].shape[1]
        fill = state.fills[group] if state.fills is not None else None
        if fill is not None and fill.length == filled and past[0].shape[2] >= filled + length:
            return past, fill
        return grown_buffers(past, filled, self.cache_capacity(group, filled + length)), CacheFill(filled)


class DelegatingBackend(Backend):
    """``inner``'s units, for a wrapper that watches or changes some of them (validate's
    recorder, the bench's ideal baseline and prune clock, test doubles): it overrides those
    and inherits the request logic, so prefill and decode drive its units."""

    def __init__(self, inner: Backend, name: str | None = None):
        self.inner, self.spec, self.device, self.name = inner, inner.spec, inner.device, name or inner.name
        # requests driven through this wrapper's units are recorded as its own graphs, when the inner's are
        self.replays = GraphedCalls(inner.replays.capture) if inner.replays is not None else None

    def run_vision(self, pixel_values):
        return self.inner.run_vision(pixel_values)

    def run_embed(self, input_ids):
        return self.inner.run_embed(input_ids)

    def run_qkv(self, hidden_states):
        return self.inner.run_qkv(hidden_states)

    def run_prune(self, stage, *inputs):
        return self.inner.run_prune(stage, *inputs)

    def run_group(self, group, *inputs):
        return self.inner.run_group(group, *inputs)


def grown_buffers(past: list[Tensor], filled: int, capacity: int) -> list[Tensor]:
    """New cache buffers of ``capacity`` slots holding the first ``filled`` of ``past``'s."""
    buffers = []
    for cache in past:
        buffer = cache.new_zeros(*cache.shape[:2], capacity, cache.shape[3])  # zeros: masked slots stay finite
        buffer[:, :, :filled] = cache[:, :, :filled]
        buffers.append(buffer)
    return buffers


def group_results(schedule, group: int, outputs: dict[str, Tensor]) -> tuple[Tensor, QKV | None, list[Tensor]]:
    """A ``decoder_{group}`` unit's outputs by name -> :meth:`Backend.run_group`'s result."""
    groups = schedule.layer_groups()
    (start, stop), last = groups[group], group == len(groups) - 1
    out = outputs["logits" if last else "hidden_states_out"]
    next_qkv = None if last else QKV(*(outputs[name] for name in NEXT_QKV))
    return out, next_qkv, [outputs[name] for name in kv_names(NEW_KV, range(start, stop))]


def run_vision_graphs(run, spec: ModelSpec, pixel_values: Tensor) -> dict[str, Tensor]:
    """The exported vision graphs on ``pixel_values``, with ``run(graph, *inputs)`` -> outputs by
    name: ``vision_encoder``; for a multi-crop image [B, views, 3, H, W] every view through it as
    one batch, then the grid's layout graph."""
    pixels = pixel_values.to(spec.vision_torch_dtype)
    schedule = spec.schedule
    if schedule.grid is None:
        return run(VISION_ENCODER, pixels)
    if pixels.dim() != 5 or pixels.shape[1] != schedule.views:
        raise InputError(f"pixel_values of shape {list(pixels.shape)} do not hold the {schedule.views} views of a "
                         f"{schedule.grid.describe()} crop grid: bind the backend to the image's grid (Backend.for_images)")
    batch, views = pixels.shape[:2]
    per_view = run(VISION_ENCODER, pixels.flatten(0, 1))
    return run(layout_graph(schedule), *(per_view[name].unflatten(0, (batch, views)) for name in vision_outputs(not schedule.is_full)))


def single_threaded_glue() -> None:
    """One torch thread for a process whose units run in ONNX Runtime or TensorRT.

    The host glue between their units (embedding lookup, splices, cache writes) is small torch
    ops, and torch's intra-op pool waits for every thread at every op: with one busy process on
    this project's 2 cores, the bench ideal's splices took 57 ms (median) on 2 torch threads
    against 3.7 ms on 1 (3.7 and 2.9 ms with nothing else running). The units' own sessions
    keep their threads.
    """
    torch.set_num_threads(1)


class GraphBackend(Backend):
    """A backend whose units are exported graphs called by name: ``_run(graph, *inputs)`` feeds
    the contract's inputs in order and returns the graph's outputs by name; the token
    embedding is a table lookup on the host (``embed_table``)."""

    embed_table: Tensor

    @abstractmethod
    def _run(self, graph: str, *tensors: Tensor) -> dict[str, Tensor]:
        """Run ``graph`` on ``tensors`` (its inputs in the contract's order); outputs by name."""

    def run_vision(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return run_vision_graphs(self._run, self.spec, pixel_values)

    def run_embed(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids.cpu(), self.embed_table)

    def run_qkv(self, hidden_states) -> QKV:
        return QKV(**self._run("qkv_0", hidden_states))

    def run_prune(self, stage, hidden_states, query, key, value, attention_mask, image_offset) -> PruneOutputs:
        return PruneOutputs(**self._run(prune_graph(self.spec.schedule, stage), hidden_states, query, key, value, attention_mask, image_offset))

    def run_group(self, group, hidden_states, query, key, value, attention_mask, position_ids, past):
        outputs = self._run(f"decoder_{group}", hidden_states, query, key, value, attention_mask, position_ids, *past)
        return group_results(self.spec.schedule, group, outputs)

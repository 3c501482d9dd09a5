"""Decode steps on static buffers, capturable as one CUDA graph (``--cuda-graph``).

An eager decode step launches a few hundred small kernels (per group: embed, q/k/v, the
layers, the cache writes, the masks) whose launch cost exceeds their work at batch 1 on a
GPU. Here a step is a function of fixed tensors only: the token ids, each group's cache
buffers and mask, and each group's fill count *on the device*. The new keys and values go
into the buffers at that count (``index_copy_``), the mask gains that slot, the count grows,
all without a host round trip, so the same step can be recorded once as a
:class:`torch.cuda.CUDAGraph` and replayed for every token until the buffers are full.

A binding (the buffers, their graph) starts from any :class:`DecoderState`: its filled part
is copied once into buffers with :data:`ROOM` slots to spare. Steps from the state the
binding returned last replay the graph; any other state (a prefix answered again, an older
state, a longer prompt) binds anew, as does a full buffer. The step's arithmetic is the eager
step's (the same units, masks and positions), so tokens are identical and logits equal to
rounding (``tests/test_static_decode.py`` checks it on CPU without capture, and with capture
on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import CACHE_BLOCK, Backend, CacheFill, DecoderState, grown_buffers

ROOM = 4 * CACHE_BLOCK  # slots a binding leaves free: one capture per this many tokens of a conversation


@dataclass
class _Binding:
    """One conversation's static decode buffers (and its graph, once captured)."""

    tokens: Tensor  # [B, 1] the step's input ids
    caches: list[list[Tensor]]  # per group [k0, v0, ...] each [B, H_kv, C_g, hd]
    masks: list[Tensor]  # per group [B, C_g + 1]: the cache's filled slots, then the new token's (always 1)
    fills: list[Tensor]  # per group: the filled slot count, on the device ([1], int64)
    lengths: list[int]  # the same counts on the host (they grow by one per step, known without a sync)
    shared: list[CacheFill]  # per group, shared by every state on these buffers: only the newest writes on (Backend.extend)
    logits: Tensor | None = None  # the graph's output
    graph: object | None = None  # torch.cuda.CUDAGraph once captured
    last: DecoderState | None = None  # the state the last step returned

    def continues(self, state: DecoderState) -> bool:
        """Whether a step from ``state`` can replay here: it is the state the last step returned,
        nobody wrote on its buffers since (an eager ``extend`` does, in place) and a slot is free."""
        return (state is self.last and all(f.length == n for f, n in zip(self.shared, self.lengths))
                and all(n < c[0].shape[2] for n, c in zip(self.lengths, self.caches)))


class StaticDecoder:
    """Greedy decode steps for ``backend`` on static buffers; ``capture`` records each binding's
    step as a CUDA graph (a CUDA device only), else the same step runs eagerly."""

    def __init__(self, backend: Backend, capture: bool):
        self.backend, self.capture = backend, capture
        self._binding: _Binding | None = None

    def step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        binding = self._binding
        if binding is None or not binding.continues(state):
            binding = self._binding = self._bind(state)
        binding.tokens.copy_(tokens.view(-1, 1))
        if self.capture:
            if binding.graph is None:
                self._capture(binding)
            binding.graph.replay()
        else:
            binding.logits = self._run(binding)
        binding.lengths = [n + 1 for n in binding.lengths]
        for fill, length in zip(binding.shared, binding.lengths):
            fill.length = length
        new_state = DecoderState(caches=binding.caches, masks=[m[:, :n] for m, n in zip(binding.masks, binding.lengths)],
                                 fills=binding.shared)
        binding.last = new_state
        return binding.logits.clone(), new_state

    def _bind(self, state: DecoderState) -> _Binding:
        """Static buffers holding ``state``'s filled slots with :data:`ROOM` to spare."""
        device = self.backend.device
        caches, masks, fills, lengths = [], [], [], []
        for past, mask in zip(state.caches, state.masks):
            filled = mask.shape[1]
            capacity = self.backend.cache_capacity(len(caches), filled + ROOM)
            buffers = grown_buffers(past, filled, capacity)
            static_mask = mask.new_zeros(mask.shape[0], capacity + 1)
            static_mask[:, :filled] = mask
            static_mask[:, -1] = 1
            caches.append(buffers)
            masks.append(static_mask)
            fills.append(torch.tensor([filled], dtype=torch.int64, device=device))
            lengths.append(filled)
        tokens = torch.zeros(state.masks[0].shape[0], 1, dtype=torch.int64, device=device)
        return _Binding(tokens, caches, masks, fills, lengths, [CacheFill(n) for n in lengths])

    def _run(self, binding: _Binding) -> Tensor:
        """One step on the binding's tensors: the eager ``extend`` of one token, with device-side offsets."""
        backend = self.backend
        hidden = backend.run_embed(binding.tokens)
        qkv = backend.run_qkv(hidden)
        for group in range(backend.num_groups):
            mask, fill, buffers = binding.masks[group], binding.fills[group], binding.caches[group]
            position_ids = mask[:, :-1].sum(-1, keepdim=True)  # the real cache length: the new token's position
            hidden, qkv, new_key_values = backend.run_group(group, hidden, *qkv, mask, position_ids, buffers)
            for buffer, new in zip(buffers, new_key_values, strict=True):
                buffer.index_copy_(2, fill, new)
            mask.index_fill_(1, fill, 1)
            fill.add_(1)
        return hidden

    def _capture(self, binding: _Binding) -> None:
        """Record the binding's step, after a warm-up on a side stream (as capture requires).
        The warm-up is a real step: its slot is unmasked again and the counts put back (the
        keys and values it wrote sit in a masked slot the next step overwrites)."""
        device = self.backend.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._run(binding)
            for mask, fill in zip(binding.masks, binding.fills):
                fill.sub_(1)
                mask.index_fill_(1, fill, 0)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running
            binding.logits = self._run(binding)
        binding.graph = graph

"""The vision encode and the prefill as CUDA graph replays (``--cuda-graph``), one per input shape.

At batch 1 on a GPU an eager prefill is bound by kernel launches, not by arithmetic: on an
H200 with the LLaVA-1.5-7B shape (fp16) the unpruned LLM prefill took 30-47 ms for about
12 ms of matrix work, and the pruned one 55-69 ms, a third of it in the prune units' small
ops. Yet every unit and the glue between them (:meth:`Backend.prefill`) is a device-side
function of fixed shapes: the budget fixes every token count, and nothing reads a value on
the host (``tests/test_static_prefill.py`` checks that). So a call is recorded once per key
(the request's name, the schedule, the inputs' shapes) and replayed.

A key's first call runs eagerly and only its second records (two warm-up runs on a side
stream, then the capture), so shapes that never repeat (a server's one-off prompt lengths)
cost nothing extra; at most :data:`MAX_GRAPHS` recordings are kept, the least recently used
dropped first. A replay's outputs are copied out of the graph's buffers (for the 7B shape at
batch 1 the unpruned caches are 0.3 GB, about 0.2 ms of copying), so a returned state stays
valid after the next replay.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

MAX_GRAPHS = 8  # recorded calls kept (each holds its intermediates' memory in its own pool)
WARMUP_RUNS = 2  # eager runs on the side stream before a capture (lazy cuBLAS/allocator set-up)


@dataclasses.dataclass
class _Recording:
    inputs: list[Tensor]  # the static input buffers a replay reads
    graph: Any  # torch.cuda.CUDAGraph, or None when not capturing
    outputs: Any  # the graph's outputs (overwritten by each replay)


class GraphedCalls:
    """Calls of tensor functions, recorded as CUDA graphs after their second sight of a key.

    ``capture=False`` runs the same path (keys, static input buffers) eagerly: the CPU tests
    check its plumbing, a GPU test the recorded replays.
    """

    def __init__(self, capture: bool = True):
        self.capture = capture
        self._seen: set[Hashable] = set()
        self._recordings: OrderedDict[Hashable, _Recording] = OrderedDict()

    def __call__(self, name: str, schedule: Hashable, fn: Callable[..., Any], *inputs: Tensor) -> Any:
        key = (name, schedule, tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs))
        recording = self._recordings.get(key)
        if recording is None:
            if key not in self._seen:
                self._seen.add(key)
                return fn(*inputs)
            recording = self._recordings[key] = self._record(fn, inputs)
            while len(self._recordings) > MAX_GRAPHS:
                self._recordings.popitem(last=False)
        self._recordings.move_to_end(key)
        for buffer, value in zip(recording.inputs, inputs, strict=True):
            buffer.copy_(value)
        if recording.graph is None:  # an eager run returns fresh tensors: nothing to copy out
            return fn(*recording.inputs)
        recording.graph.replay()
        return copied(recording.outputs)

    def _record(self, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> _Recording:
        buffers = [t.clone() for t in inputs]
        if not self.capture:
            return _Recording(buffers, None, None)
        device = buffers[0].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                fn(*buffers)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running
            outputs = fn(*buffers)
        return _Recording(buffers, graph, outputs)


def copied(value: Any) -> Any:
    """``value`` with every tensor in it cloned (tensors in lists, tuples, dicts, dataclasses)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: copied(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(copied(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(copied(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: copied(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    return value

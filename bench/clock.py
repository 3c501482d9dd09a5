"""Time spent inside marked spans of a request, measured within it (so free of the drift between requests)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class SpanClock:
    """Sums the time inside :meth:`span` blocks: host time on CPU; on CUDA events recorded on
    the stream, so the request gains no host sync (read them after the request's own sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list = []

    @contextmanager
    def span(self) -> Iterator[None]:
        self._marks.append(self._mark())
        try:
            yield
        finally:
            self._marks.append(self._mark())

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter() * 1e3
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def spent(self) -> float:
        """Milliseconds inside spans since the last call."""
        pairs, self._marks = list(zip(self._marks[::2], self._marks[1::2])), []
        if self.device.type == "cuda":
            return sum(start.elapsed_time(stop) for start, stop in pairs)
        return sum(stop - start for start, stop in pairs)

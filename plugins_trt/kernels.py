"""ctypes binding of the VisionDrop kernels' C ABI (visiondrop_kernels.h) on torch CUDA tensors.

For tests and GPU checks: ``select`` / ``merge`` mirror ``visiondrop_edge.pruning.select`` / ``merge``
(same fields and shapes: ``Selection``, ``Merged``; indices are int32) but run the CUDA kernels on
the current stream.

    from visiondrop_edge.plugins_trt import kernels
    kernels.load("build/plugins_trt/libvisiondrop_kernels.so")   # or $VISIONDROP_KERNELS_LIB
    chosen = kernels.select(scores, tokens, metric, k)
    merged = kernels.merge(chosen.rest_tokens, chosen.rest_metric, c)   # .tokens, .assignment

``out=`` takes preallocated outputs (the tests poison them with NaN first).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from visiondrop_edge.plugins_trt import DEFAULT_BUILD_DIR
from visiondrop_edge.pruning import Merged, Selection

DEFAULT_LIBRARY = DEFAULT_BUILD_DIR / "libvisiondrop_kernels.so"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_P, _I, _SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t


class Kernels:
    """The C ABI of one loaded library (libvisiondrop_kernels.so, or the plugin library, which exports it too)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.vd_select.argtypes = [_P] * 8 + [_I] * 6 + [_P, _P]
        self.lib.vd_merge.argtypes = [_P] * 4 + [_I] * 6 + [_P, _P]
        self.lib.vd_select.restype = self.lib.vd_merge.restype = _I
        for name in ("vd_select_workspace_size", "vd_merge_workspace_size"):
            getattr(self.lib, name).argtypes = [_I, _I, _I]
            getattr(self.lib, name).restype = _SIZE

    def select(self, scores: Tensor, tokens: Tensor, metric: Tensor, k: int, out: Selection | None = None) -> Selection:
        """Top-``k`` of ``scores`` [B, N]: dominant/rest tokens, rest metric rows and both index lists."""
        scores, tokens, metric = scores.contiguous(), tokens.contiguous(), metric.contiguous()
        batch, n, width = tokens.shape
        _check(scores, torch.float32, (batch, n), "scores")
        _check(metric, torch.float32, (batch, n, metric.shape[-1]), "metric")
        _check(tokens, tokens.dtype, (batch, n, width), "tokens")
        m = metric.shape[-1]
        if out is None:
            new = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=tokens.device)  # noqa: E731
            out = Selection(new((batch, k, width), tokens.dtype), new((batch, n - k, width), tokens.dtype),
                            new((batch, n - k, m), torch.float32), new((batch, k), torch.int32),
                            new((batch, n - k), torch.int32))
        _check(out.dominant, tokens.dtype, (batch, k, width), "dominant")
        _check(out.rest_tokens, tokens.dtype, (batch, n - k, width), "rest_tokens")
        _check(out.rest_metric, torch.float32, (batch, n - k, m), "rest_metric")
        _check(out.kept_index, torch.int32, (batch, k), "kept_index")
        _check(out.rest_index, torch.int32, (batch, n - k), "rest_index")
        workspace = self._workspace(self.lib.vd_select_workspace_size(batch, n, k), tokens.device)
        status = self.lib.vd_select(
            _ptr(scores), _ptr(tokens), _ptr(metric), _ptr(out.dominant), _ptr(out.rest_tokens),
            _ptr(out.rest_metric), _ptr(out.kept_index), _ptr(out.rest_index),
            batch, n, width, m, k, _code(tokens), _ptr(workspace), _stream(tokens),
        )
        if status:
            raise RuntimeError(f"vd_select failed with CUDA error {status} (B={batch}, N={n}, D={width}, M={m}, k={k})")
        return out

    def merge(self, rest_tokens: Tensor, rest_metric: Tensor, c: int, out: Merged | None = None) -> Merged:
        """``c`` contextual tokens [B, c, D] and each member's target [B, R - c] (int32).

        The assignment is ``pruning.merge``'s (members in ``member_positions`` order, first
        target wins ties); ``out`` takes both preallocated.
        """
        rest_tokens, rest_metric = rest_tokens.contiguous(), rest_metric.contiguous()
        batch, r, width = rest_tokens.shape
        _check(rest_tokens, rest_tokens.dtype, (batch, r, width), "rest_tokens")
        _check(rest_metric, torch.float32, (batch, r, rest_metric.shape[-1]), "rest_metric")
        if out is None:
            out = Merged(torch.empty((batch, c, width), dtype=rest_tokens.dtype, device=rest_tokens.device),
                         torch.empty((batch, r - c), dtype=torch.int32, device=rest_tokens.device))
        contextual, assignment = out.tokens, out.assignment
        _check(contextual, rest_tokens.dtype, (batch, c, width), "contextual")
        _check(assignment, torch.int32, (batch, r - c), "assignment")
        workspace = self._workspace(self.lib.vd_merge_workspace_size(batch, r, c), rest_tokens.device)
        status = self.lib.vd_merge(
            _ptr(rest_tokens), _ptr(rest_metric), _ptr(contextual), _ptr(assignment), batch, r, width,
            rest_metric.shape[-1], c, _code(rest_tokens), _ptr(workspace), _stream(rest_tokens),
        )
        if status:
            raise RuntimeError(f"vd_merge failed with CUDA error {status} (B={batch}, R={r}, D={width}, c={c})")
        return out

    @staticmethod
    def _workspace(size: int, device: torch.device) -> Tensor | None:
        return torch.empty(size, dtype=torch.uint8, device=device) if size else None


def _check(tensor: Tensor, dtype: torch.dtype, shape: tuple, name: str) -> None:
    """Inputs are made contiguous by the callers; preallocated outputs must already be."""
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CUDA tensor")
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")


def _code(tokens: Tensor) -> int:
    if tokens.dtype not in DTYPE_CODES:
        raise TypeError(f"token dtype {tokens.dtype} is not supported (float32, float16, bfloat16)")
    return DTYPE_CODES[tokens.dtype]


def _ptr(tensor: Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None and tensor.numel() else None


def _stream(tensor: Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


_loaded: Kernels | None = None


def load(path: str | os.PathLike | None = None) -> Kernels:
    """Load the library (default: $VISIONDROP_KERNELS_LIB, else build/plugins_trt/) for the module functions."""
    global _loaded
    _loaded = Kernels(path or os.environ.get("VISIONDROP_KERNELS_LIB") or DEFAULT_LIBRARY)
    return _loaded


def _library() -> Kernels:
    return _loaded or load()


def select(scores: Tensor, tokens: Tensor, metric: Tensor, k: int, out: Selection | None = None) -> Selection:
    """``visiondrop_edge.pruning.select`` on the CUDA kernel (see :meth:`Kernels.select`)."""
    return _library().select(scores, tokens, metric, k, out)


def merge(rest_tokens: Tensor, rest_metric: Tensor, c: int, out: Merged | None = None) -> Merged:
    """``visiondrop_edge.pruning.merge`` on the CUDA kernel (see :meth:`Kernels.merge`)."""
    return _library().merge(rest_tokens, rest_metric, c, out)

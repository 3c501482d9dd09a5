"""Repository-wide pytest setup: visible hardware skips (the package is installed: `pip install -e .`).

Tests marked ``gpu`` need a CUDA GPU, ``trt`` need TensorRT; where this machine lacks
them they are skipped with the reason (never counted as passed).
"""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    reasons = {
        "gpu": None if _has_cuda() else "needs an NVIDIA GPU with CUDA (none visible to PyTorch here)",
        "trt": None if _has_tensorrt() else "needs TensorRT (the 'tensorrt' Python package is not installed here)",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Commands that run ONNX Runtime or TensorRT units pin torch to one thread for the process
    (runtime.base.single_threaded_glue); in-process CLI tests must not leave it so for the next test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

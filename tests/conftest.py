"""Shared fixtures: the built-in tiny model in a per-session cache, and hardware markers."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A private model cache for the session (subprocesses inherit it through the environment).
_CACHE = Path(tempfile.mkdtemp(prefix="visiondrop-test-cache-"))
os.environ["VISIONDROP_CACHE"] = str(_CACHE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


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
    """Skip, visibly and with the reason, what needs hardware this machine lacks."""
    reasons = {
        "gpu": None if _has_cuda() else "needs an NVIDIA GPU with CUDA (none visible to PyTorch here)",
        "trt": None if _has_tensorrt() else "needs TensorRT (the 'tensorrt' Python package is not installed here)",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model, loaded through from_pretrained like a real checkpoint."""
    from visiondrop.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_eager(tiny):
    """A second, independent copy with HF's eager attention, for the naive reference."""
    from transformers import LlavaForConditionalGeneration

    from visiondrop.loading import builtin_dir

    return LlavaForConditionalGeneration.from_pretrained(builtin_dir("tiny"), attn_implementation="eager").eval()

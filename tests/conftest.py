"""Shared fixtures: the built-in tiny model in a per-session cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny model, loaded through from_pretrained like a real checkpoint."""
    from visiondrop_edge.loading import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_half():
    """The built-in tiny model in fp16 (a separate copy: tests may not change ``tiny``)."""
    import torch

    from visiondrop_edge.loading import load_model

    return load_model("tiny", dtype=torch.float16)


@pytest.fixture(scope="session")
def tiny_eager(tiny):
    """A second, independent copy with HF's eager attention, for the naive reference."""
    from transformers import LlavaForConditionalGeneration

    from visiondrop_edge.loading import builtin_dir

    return LlavaForConditionalGeneration.from_pretrained(builtin_dir("tiny"), attn_implementation="eager").eval()

"""Fixtures for the plugin/kernel tests: one cached CMake build per session.

Hardware skips (``gpu``/``trt`` markers) come from the repository's root conftest.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from visiondrop_edge.plugins_trt import build as vd_build

TEST_BUILD_ROOT = vd_build.DEFAULT_BUILD_DIR / "tests"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # trt_stub

from trt_stub import header_major, stub_nvinfer, trt_include_dir  # noqa: E402


def build_or_skip(arch: str) -> dict[str, Path]:
    """Build for one architecture into build/plugins_trt/tests/sm<arch> (incremental across sessions).

    Skips when cmake or nvcc is missing; $TensorRT_ROOT (or JetPack headers) adds both plugin
    libraries, the static-registration one linked against a libnvinfer stub (a link check: the
    smoke test interposes its own registry) unless $VISIONDROP_NVINFER_LIB names a real one.
    """
    if vd_build.find_cmake() is None:
        pytest.skip("cmake not found on PATH (install CMake >= 3.18)")
    if vd_build.find_nvcc() is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDACXX)")
    build_dir = TEST_BUILD_ROOT / f"sm{arch}"
    include = trt_include_dir()
    nvinfer = os.environ.get("VISIONDROP_NVINFER_LIB") or (
        stub_nvinfer(build_dir / "nvinfer_stub", header_major(include)) if include else None)
    return vd_build.build(archs=[arch], build_dir=build_dir, jobs=max(2, os.cpu_count() or 2),
                          nvinfer_library=nvinfer)


@pytest.fixture(scope="session")
def sm90_build() -> dict[str, Path]:
    """The libraries built once per session for sm_90 (the compile check; no GPU needed)."""
    return build_or_skip("90")


@pytest.fixture(scope="session")
def kernels():
    """The kernels on this machine's GPU: $VISIONDROP_KERNELS_LIB, else built for the GPU's architecture."""
    import torch

    from visiondrop_edge.plugins_trt.kernels import Kernels

    path = os.environ.get("VISIONDROP_KERNELS_LIB")
    if not path:
        major, minor = torch.cuda.get_device_capability()
        path = build_or_skip(f"{major}{minor}")["kernels"]
    return Kernels(path)

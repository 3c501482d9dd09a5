"""Compile checks (no GPU needed): the kernels library and, with TensorRT headers, the plugin library."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

C_ABI = ("vd_select", "vd_merge", "vd_select_workspace_size", "vd_merge_workspace_size")
NO_TRT_HEADERS = "TensorRT headers not found: set TensorRT_ROOT to a TensorRT include root"


def tool_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH")
    return path


def exported(library: Path, undefined: bool = False) -> dict[str, str]:
    """Dynamic symbols of ``library`` as {name: nm type letter}."""
    nm = tool_or_skip("nm")
    flag = "--undefined-only" if undefined else "--defined-only"
    lines = subprocess.run([nm, "-D", flag, str(library)], capture_output=True, text=True, check=True).stdout
    return {parts[-1]: parts[-2] for parts in (line.split() for line in lines.splitlines()) if len(parts) >= 2}


def test_kernels_library_builds_and_exports_c_abi(sm90_build):
    library = sm90_build["kernels"]
    assert library.is_file()
    symbols = exported(library)
    for name in C_ABI:
        assert symbols.get(name) == "T", f"{name} is not exported by {library.name}"
    assert not any(name.startswith("_Z") for name, kind in symbols.items() if kind == "T"), "only the C ABI is exported"


def _trt_headers_expected() -> bool:
    root = os.environ.get("TensorRT_ROOT")
    return bool(root) and (Path(root) / "include" / "NvInferRuntime.h").is_file()


def _plugins(build: dict[str, Path]) -> Path:
    if "plugins" not in build:
        assert not _trt_headers_expected(), "TensorRT_ROOT has headers but the plugin library was not built"
        pytest.skip(NO_TRT_HEADERS)
    return build["plugins"]


def test_plugin_library_exports_loader_entry_points_without_nvinfer(sm90_build):
    library = _plugins(sm90_build)
    symbols = exported(library)
    for name in ("getCreators", "setLoggerFinder", *C_ABI):
        assert symbols.get(name) == "T", f"{name} is not exported by {library.name}"
    undefined = [name for name in exported(library, undefined=True) if "nvinfer" in name.lower()]
    assert not undefined, f"undefined TensorRT symbols: {undefined}"
    readelf = tool_or_skip("readelf")
    needed = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libnvinfer" not in needed, "the plugin library must not need libnvinfer at link time"
    # Loadable with every symbol resolved (RTLD_NOW), and getCreators answers without TensorRT.
    lib = ctypes.CDLL(str(library))
    lib.getCreators.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    lib.getCreators.restype = ctypes.c_void_p
    count = ctypes.c_int32(0)
    assert lib.getCreators(ctypes.byref(count)) and count.value == 2


def _cache_value(build_dir: Path, name: str) -> str:
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split("=", 1)[1]
    return ""


def test_plugins_behave_through_the_tensorrt_interfaces(sm90_build, tmp_path):
    """plugin_smoke.cpp: creators, shapes, types, formats, serialisation, via the headers only."""
    library = _plugins(sm90_build)
    compiler = tool_or_skip("g++")
    build_dir = library.parent
    includes = [_cache_value(build_dir, "VISIONDROP_TRT_INCLUDE")]
    includes += _cache_value(build_dir, "VISIONDROP_CUDA_INCLUDE_DIRS").split(";")
    executable = tmp_path / "plugin_smoke"
    source = Path(__file__).with_name("plugin_smoke.cpp")
    compile_command = [compiler, "-std=c++17", "-Wno-deprecated-declarations", *(f"-I{d}" for d in includes if d),
                       str(source), "-ldl", "-o", str(executable)]
    compiled = subprocess.run(compile_command, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    run = subprocess.run([str(executable), str(library)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "plugin smoke OK" in run.stdout, run.stdout + run.stderr

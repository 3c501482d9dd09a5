"""Compile checks (no GPU needed): the kernels library and, with TensorRT headers, the plugin library."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from trt_stub import header_major, trt_include_dir

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


def _plugins(build: dict[str, Path], variant: str = "plugins") -> Path:
    if variant not in build:
        assert not _trt_headers_expected(), f"TensorRT_ROOT has headers but the {variant} library was not built"
        pytest.skip(NO_TRT_HEADERS)
    return build[variant]


def _needed(library: Path) -> list[str]:
    readelf = tool_or_skip("readelf")
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]


def test_plugin_library_exports_loader_entry_points_without_nvinfer(sm90_build):
    library = _plugins(sm90_build)
    symbols = exported(library)
    for name in ("getCreators", "setLoggerFinder", *C_ABI):
        assert symbols.get(name) == "T", f"{name} is not exported by {library.name}"
    undefined = exported(library, undefined=True)
    trt_entry_points = [n for n in undefined if "nvinfer" in n.lower() or n in ("getPluginRegistry", "getLogger")]
    assert not trt_entry_points, f"undefined TensorRT symbols: {trt_entry_points}"
    assert not any("libnvinfer" in n for n in _needed(library)), "the plugin library must not need libnvinfer"
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


def test_static_plugin_library_registers_at_load_and_exports_no_getcreators(sm90_build):
    """The dlopen variant: registration through libnvinfer's getPluginRegistry, no loadLibrary entry points."""
    library = _plugins(sm90_build, "plugins_static")
    symbols = exported(library)
    assert "getCreators" not in symbols and "setLoggerFinder" not in symbols, \
        "a library that registers itself must not also offer getCreators (loadLibrary would fail on it)"
    for name in C_ABI:
        assert symbols.get(name) == "T", f"{name} is not exported by {library.name}"
    undefined = exported(library, undefined=True)
    assert {"getPluginRegistry", "getLogger"} <= set(undefined), sorted(undefined)
    assert not [n for n in undefined if "nvinfer" in n.lower()], "only the two C entry points come from libnvinfer"
    major = header_major(trt_include_dir())
    assert f"libnvinfer.so.{major}" in _needed(library)


def _smoke_executable(build_dir: Path, tmp_path: Path) -> Path:
    compiler = tool_or_skip("g++")
    includes = [_cache_value(build_dir, "VISIONDROP_TRT_INCLUDE")]
    includes += _cache_value(build_dir, "VISIONDROP_CUDA_INCLUDE_DIRS").split(";")
    executable = tmp_path / "plugin_smoke"
    source = Path(__file__).with_name("plugin_smoke.cpp")
    compile_command = [compiler, "-std=c++17", "-rdynamic", "-Wall", "-Wno-deprecated-declarations",
                       *(f"-I{d}" for d in includes if d), str(source), "-ldl", "-o", str(executable)]
    compiled = subprocess.run(compile_command, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    return executable


def test_plugins_behave_through_the_tensorrt_interfaces(sm90_build, tmp_path):
    """plugin_smoke.cpp: creators, shapes, types, formats, serialisation, via the headers only (getCreators)."""
    library = _plugins(sm90_build)
    run = subprocess.run([str(_smoke_executable(library.parent, tmp_path)), str(library)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "plugin smoke (getCreators) OK" in run.stdout, run.stdout + run.stderr


def test_static_plugins_register_both_creators_when_loaded(sm90_build, tmp_path):
    """plugin_smoke.cpp --static: loading registers exactly the two creators under "visiondrop"."""
    library = _plugins(sm90_build, "plugins_static")
    stub_dir = library.parent / "nvinfer_stub"  # satisfies the NEEDED libnvinfer; the executable interposes
    env = dict(os.environ, LD_LIBRARY_PATH=f"{stub_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    run = subprocess.run([str(_smoke_executable(library.parent, tmp_path)), "--static", str(library)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0 and "plugin smoke (static registration) OK" in run.stdout, run.stdout + run.stderr

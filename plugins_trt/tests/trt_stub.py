"""The libnvinfer stub (nvinfer_stub.c) and where the TensorRT headers are, for the tests and the API check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

STUB_SOURCE = Path(__file__).resolve().with_name("nvinfer_stub.c")
STUB_LIBRARIES = ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser")
JETPACK_INCLUDE_DIRS = (Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include/x86_64-linux-gnu"))
HEADER_MAJOR = re.compile(r"#define\s+(?:NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE)\s+(\d+)")


def trt_include_dir() -> Path | None:
    """The TensorRT headers CMake will use: $TensorRT_ROOT/include, else the JetPack / Debian folders."""
    root = os.environ.get("TensorRT_ROOT")
    candidates = [Path(root) / "include"] if root else list(JETPACK_INCLUDE_DIRS)
    return next((d for d in candidates if (d / "NvInferRuntime.h").is_file()), None)


def header_major(include: Path) -> int:
    return int(HEADER_MAJOR.search((include / "NvInferVersion.h").read_text()).group(1))


def stub_nvinfer(directory: Path, major: int) -> Path:
    """A libnvinfer.so stand-in (soname libnvinfer.so.<major>) to link the static-registration variant."""
    build_stub(directory)
    link = directory / "libnvinfer.so"
    link.unlink(missing_ok=True)
    link.symlink_to(f"libnvinfer.so.{major}")
    return link


def build_stub(directory: Path) -> Path:
    """Compile nvinfer_stub.c once per soname TensorRT 10 and 11 bindings need; returns the folder."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) to build the libnvinfer stub")
    directory.mkdir(parents=True, exist_ok=True)
    for major in (10, 11):
        for name in STUB_LIBRARIES:
            soname = f"{name}.so.{major}"
            subprocess.run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{soname}", str(STUB_SOURCE), "-o",
                            str(directory / soname)], check=True, capture_output=True)
    return directory

"""Build the VisionDrop CUDA kernels, and the TensorRT plugins when TensorRT headers are found.

    python -m visiondrop_edge.plugins_trt.build [--tensorrt-root DIR] [--arch 90 ...] [--build-dir DIR] [--nvinfer LIB]

or ``build(tensorrt_root=None, archs=None) -> {"kernels": path[, "plugins": path[, "plugins_static": path]]}``.
CMake does the work (plugins_trt/CMakeLists.txt); this module only checks the tools first so that a
missing cmake or nvcc is reported as such, and returns the built libraries' paths. The plugin
library comes in two variants (see src/visiondrop_plugins.cpp): ``plugins`` exports getCreators,
``plugins_static`` registers itself when loaded and is built only where libnvinfer is found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from visiondrop_edge.plugins_trt import DEFAULT_BUILD_DIR, PLUGIN_LIBRARY, STATIC_PLUGIN_LIBRARY

SOURCE_DIR = Path(__file__).resolve().parent
KERNELS_LIB = "libvisiondrop_kernels.so"


class BuildError(RuntimeError):
    """A tool is missing or the CMake configure/build failed (the message says which)."""


def find_cmake() -> str | None:
    return shutil.which("cmake")


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH, $CUDA_HOME/$CUDA_PATH or /usr/local/cuda (the places CMake would look)."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    candidates += [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _run(command: list[str], what: str, verbose: bool) -> None:
    result = subprocess.run(command, capture_output=not verbose, text=True)
    if result.returncode != 0:
        tail = "" if verbose else "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")


def build(
    tensorrt_root: str | os.PathLike | None = None,
    archs: list[str] | str | None = None,
    build_dir: str | os.PathLike | None = None,
    jobs: int | None = None,
    verbose: bool = False,
    nvinfer_library: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Configure and build; return ``{"kernels": lib}`` plus ``"plugins"`` if TensorRT headers were found
    and ``"plugins_static"`` if libnvinfer was too.

    ``tensorrt_root`` defaults to ``$TensorRT_ROOT`` (then the JetPack header paths); ``archs``
    (e.g. ``["90"]`` or ``"87;90"``) defaults to the CMake list 87;89;90;110;120; ``nvinfer_library``
    (the libnvinfer.so to link the static-registration variant against) defaults to CMake's search
    of ``<tensorrt_root>/lib`` and the JetPack / Debian library folders.
    """
    cmake = find_cmake()
    if cmake is None:
        raise BuildError("cmake not found on PATH: install CMake >= 3.18 (apt install cmake, or pip install cmake)")
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError(
            "nvcc not found (PATH, $CUDACXX, $CUDA_HOME, /usr/local/cuda): install the CUDA toolkit "
            "(cuda-toolkit / JetPack's cuda-nvcc) or point CUDACXX at nvcc"
        )
    if nvinfer_library and not Path(nvinfer_library).is_file():
        raise BuildError(f"--nvinfer {nvinfer_library} does not exist: give the path of libnvinfer.so "
                         "(TensorRT's lib/ folder, or /usr/lib/aarch64-linux-gnu on Jetson)")
    out = Path(build_dir) if build_dir else DEFAULT_BUILD_DIR
    out.mkdir(parents=True, exist_ok=True)
    root = str(tensorrt_root) if tensorrt_root else os.environ.get("TensorRT_ROOT", "")
    command = [cmake, "-S", str(SOURCE_DIR), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DTensorRT_ROOT={root}"]
    if archs:
        command.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs if isinstance(archs, str) else ';'.join(map(str, archs))}")
    else:
        command.append("-UCMAKE_CUDA_ARCHITECTURES")  # back to the CMakeLists default, not a cached list
    # An explicit libnvinfer, else a fresh search (never a cached path from an earlier configure).
    command.append(f"-DVISIONDROP_NVINFER_LIBRARY={nvinfer_library}" if nvinfer_library
                   else "-UVISIONDROP_NVINFER_LIBRARY")
    for stale in (PLUGIN_LIBRARY, STATIC_PLUGIN_LIBRARY):  # a stale plugin library must not look freshly built
        (out / stale).unlink(missing_ok=True)
    _run(command, "CMake configure", verbose)
    _run([cmake, "--build", str(out), "--parallel", str(jobs or os.cpu_count() or 2)], "CMake build", verbose)
    built = {"kernels": out / KERNELS_LIB}
    for key, name in (("plugins", PLUGIN_LIBRARY), ("plugins_static", STATIC_PLUGIN_LIBRARY)):
        if (out / name).exists():
            built[key] = out / name
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visiondrop_edge.plugins_trt.build", description=__doc__.split("\n")[0])
    parser.add_argument("--tensorrt-root", help="TensorRT root with include/NvInferRuntime.h (default: $TensorRT_ROOT)")
    parser.add_argument("--arch", action="append", help="CUDA architecture, repeatable (default: 87;89;90;110;120)")
    parser.add_argument("--build-dir", default=str(DEFAULT_BUILD_DIR))
    parser.add_argument("--nvinfer", help="libnvinfer.so for the static-registration variant (default: searched)")
    parser.add_argument("-j", "--jobs", type=int)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the CMake output")
    args = parser.parse_args(argv)
    try:
        built = build(args.tensorrt_root, args.arch, args.build_dir, args.jobs, args.verbose, args.nvinfer)
    except BuildError as error:
        parser.exit(1, f"error: {error}\n")
    for name, path in built.items():
        print(f"{name}: {path}")
    if "plugins" not in built:
        print("plugins: not built (no TensorRT headers: pass --tensorrt-root or set TensorRT_ROOT)")
    elif "plugins_static" not in built:
        print("plugins_static: not built (libnvinfer not found: pass --nvinfer PATH/libnvinfer.so)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Finding and loading the TensorRT plugin library (shared by ``build`` and the TensorRT runtime)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from visiondrop_edge.errors import SettingError, UserError

from . import DEFAULT_BUILD_DIR, PLUGIN_LIBRARY

PLUGIN_SEARCH = (DEFAULT_BUILD_DIR / PLUGIN_LIBRARY,)


def find_plugin_library(explicit: Path | None) -> Path | None:
    """--plugin-lib, else $VISIONDROP_TRT_PLUGINS, else the default CMake build folder."""
    candidates = [explicit] if explicit else [Path(p) for p in [os.environ.get("VISIONDROP_TRT_PLUGINS")] if p]
    candidates += [] if explicit else list(PLUGIN_SEARCH)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    if explicit:
        raise SettingError(f"{{plugin_lib}} {explicit} does not exist: build it with `python -m visiondrop_edge.plugins_trt.build` "
                        "(see the README's TensorRT section)")
    return None


_LOADED_PLUGINS: dict[Path, str] = {}  # once per process: TensorRT refuses to register a creator twice


def load_plugin_library(library: Path) -> str:
    """Make the plugins visible to the ONNX parser and runtime; returns how (getCreators or static registration).

    ``ctypes`` loading registers the static variant; the getCreators variant then goes through
    the registry's ``load_library``, which is what trtexec --dynamicPlugins does.
    """
    import tensorrt as trt

    library = Path(library).resolve()
    if library in _LOADED_PLUGINS:
        return _LOADED_PLUGINS[library]
    handle = ctypes.CDLL(str(library))
    how = "static registration"
    if hasattr(handle, "getCreators"):
        registry: trt.IPluginRegistry = trt.get_plugin_registry()
        if registry.load_library(str(library)) is None:
            raise UserError(f"TensorRT could not load {library} (is another VisionDrop plugin library loaded? see the "
                            "TensorRT log above)")
        how = "getCreators"
    _LOADED_PLUGINS[library] = how
    return how

"""VisionDrop's two ops as TensorRT plugins (CUDA kernels, IPluginV3 wrappers) and their
stand-ins elsewhere: ONNX nodes for plugin-mode export, CPU ops for ONNX Runtime.

A plugin node lives in the ONNX domain ``trt.plugins`` (what ModelOpt and ONNX Runtime's
TensorRT EP expect) and names its creator explicitly: ``op_type`` = plugin name, attributes
``plugin_namespace`` = "visiondrop" and ``plugin_version`` = "1" (TensorRT's parser reads the
attribute before the domain).
"""

from pathlib import Path

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAMESPACE = "visiondrop"
PLUGIN_VERSION = "1"
SELECT_OP = "VisionDropSelect"
MERGE_OP = "VisionDropMerge"
PLUGIN_LIBRARY = "libvisiondrop_trt_plugins.so"  # exports getCreators (trtexec --dynamicPlugins, load_library)
STATIC_PLUGIN_LIBRARY = "libvisiondrop_trt_plugins_static.so"  # registers when loaded (dlopen-only loaders)
# Where `python -m visiondrop_edge.plugins_trt.build` puts the libraries: relative to the working
# directory (the README's cmake commands use the same folder), never inside the installed package.
DEFAULT_BUILD_DIR = Path("build") / "plugins_trt"


def is_plugin_node(node) -> bool:
    """Whether an ONNX ``NodeProto`` is one of the VisionDrop plugin nodes."""
    return node.domain == PLUGIN_DOMAIN and node.op_type in (SELECT_OP, MERGE_OP)

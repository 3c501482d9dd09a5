"""VisionDrop's two ops as TensorRT plugins (CUDA kernels, IPluginV3 wrappers) and their
stand-ins elsewhere: ONNX nodes for plugin-mode export, CPU ops for ONNX Runtime."""

PLUGIN_NAMESPACE = "visiondrop"
PLUGIN_VERSION = "1"
SELECT_OP = "VisionDropSelect"
MERGE_OP = "VisionDropMerge"
PLUGIN_LIBRARY = "libvisiondrop_trt_plugins.so"

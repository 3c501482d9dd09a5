"""ONNX export of the VisionDrop pipeline, the artifact manifest, and parity validation."""

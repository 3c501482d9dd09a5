"""Backends that run the VisionDrop units (PyTorch, ONNX Runtime, TensorRT) and greedy generation."""

"""Calibration: explicit-quantization (Q/DQ) artifact folders from float ones (see quantize.py)."""

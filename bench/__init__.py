"""Benchmarks: speed and memory per budget (CPU here, GPU via bench/gpu.sh)."""

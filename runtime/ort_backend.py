"""ONNX Runtime backend over an artifact folder (CPU by default, CUDA EP with onnxruntime-gpu).

Tensors cross into ONNX Runtime as numpy arrays. That is free on the CPU provider; with the
CUDA provider every unit call copies through the host, so this backend is for portability
and validation, and the TensorRT backend is the fast path on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from visiondrop_edge.contract import bind
from visiondrop_edge.errors import UserError

from .base import GraphBackend, ModelSpec

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def resolve_providers(provider: str) -> list[str]:
    """``auto`` takes CUDA when onnxruntime-gpu can use it, else CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider not in PROVIDERS:
        raise UserError(f"unknown ONNX Runtime provider '{provider}': use auto, cpu or cuda")
    if PROVIDERS[provider][0] not in available:
        raise UserError.naming(
            "ONNX Runtime here has no {wanted} (available: {available}): install onnxruntime-gpu on a CUDA machine, "
            "or use {provider} cpu", wanted=PROVIDERS[provider][0], available=", ".join(available),
        )
    return PROVIDERS[provider]


def session_config(role: str, settings: dict | None = None) -> dict[str, str]:
    """The session config entries of a graph of ``role`` (a manifest graph's role): its
    thread-pool settings, then those of ``settings`` (a calibrated folder's recorded
    ``onnxruntime`` settings, see calibration/quantize.py).

    One request runs a dozen sessions back to back, on a CPU that the application may share
    (a Jetson): idle threads must not spin, or they steal the cores from the next session and
    from the application (spinning decoded 3-4x slower under ``bench --cpu-load 1`` in one
    interleaved run on 2 cores). A prune graph is the exception: weightless, hundreds of small
    ops, one call per prefill, so waking a sleeping thread at every op costs more than its
    work. It spins inside its run and stops at the run's end (``force_spinning_stop``): the
    prune units took 10-11% less time in ``bench --model small --backend ort --budgets 192``,
    both alone and under ``--cpu-load 1``. Per-session pools, not ONNX Runtime's global one:
    that one binds every session of the process to ``use_per_session_threads = False``, and
    it spins.
    """
    if role == "prune":
        threading = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    else:
        threading = {"session.intra_op.allow_spinning": "0"}
    return {**threading, **(settings or {}).get("session_config", {})}


def session_options(role: str, settings: dict | None = None, plugins: bool = False):
    """The options of this tool's ONNX Runtime session for a graph of ``role`` (see
    :func:`session_config`); ``plugins``: with the Python ops of plugin-mode graphs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    for key, value in session_config(role, settings).items():
        options.add_session_config_entry(key, value)
    if plugins:
        from visiondrop_edge.plugins_trt.ort_ops import custom_ops_library

        options.register_custom_ops_library(custom_ops_library())
    return options


class OrtBackend(GraphBackend):
    """Runs the exported graphs of an artifact folder."""

    name = "ort"

    def __init__(self, directory: str | Path, provider: str = "auto", verify: bool = True, manifest=None):
        import onnxruntime

        from visiondrop_edge.manifest import read_manifest

        self.directory = Path(directory)
        self.manifest = manifest or read_manifest(self.directory, verify=verify)
        self.spec = ModelSpec.from_dict(self.manifest.spec)
        self.device = torch.device("cpu")
        self.providers = resolve_providers(provider)
        # A calibrated folder records the settings its Q/DQ graphs need on this runtime (see
        # calibration/quantize.py): e.g. int8 keeps one Q/DQ pair per consumer, fp8 skips the QDQ transforms.
        settings = (self.manifest.export.get("quantization") or {}).get("onnxruntime") or {}
        disabled = settings.get("disabled_optimizers") or None
        plugins = self.manifest.export.get("mode") == "plugins"
        self.sessions = {
            entry.name: onnxruntime.InferenceSession(self._graph(entry, plugins), session_options(entry.role, settings, plugins),
                                                     providers=self.providers, disabled_optimizers=disabled)
            for entry in self.manifest.graphs
        }
        self.graphs = frozenset(self.sessions)
        self.output_names = {name: [o.name for o in session.get_outputs()] for name, session in self.sessions.items()}
        self.inputs = {entry.name: [i["name"] for i in entry.inputs] for entry in self.manifest.graphs}
        self.embed_table = load_file(self.directory / self.manifest.export["embed_tokens"])["weight"]

    def _graph(self, entry, plugins: bool) -> str | bytes:
        """The graph's path, or for plugin-mode artifacts the graph adapted to ONNX Runtime's Python ops."""
        path = self.directory / entry.file
        if not plugins:
            return str(path)
        import onnx

        from visiondrop_edge.plugins_trt.ort_ops import ort_model

        model = ort_model(onnx.load(str(path)))
        if model.ByteSize() >= 2**31:
            raise UserError(f"{entry.file} is over 2 GB: run plugin-mode artifacts of this size with TensorRT, not ONNX Runtime")
        return model.SerializeToString()

    def _run(self, graph: str, *tensors: Tensor) -> dict[str, Tensor]:
        """Feed ``tensors`` as the graph's inputs (the contract's order) and fetch its outputs by name."""
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in bind(self.inputs[graph], tensors).items()}
        names = self.output_names[graph]
        return {name: torch.from_numpy(out) for name, out in zip(names, self.sessions[graph].run(names, feeds), strict=True)}

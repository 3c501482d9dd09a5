"""TensorRT backend over an engine folder (``python cli.py build``), and ``doctor``.

Zero-copy: every unit's inputs and outputs are torch CUDA tensors passed to TensorRT by
address (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3`` on the current torch
stream); nothing goes through the host between units. I/O is bound by name, in the order of
the artifacts manifest's graph entry, and every ``run_*`` returns all of the graph's outputs in
that order. Engines of ``qkv_0`` / ``decoder_{g}`` hold a ``prefill`` and a ``decode``
profile: each profile has its own execution context, selected per call. All contexts share
one activation scratch buffer (user-managed device memory, sized for the largest profile):
units run one after another on the current stream, so one TrtBackend must not be driven from
two streams at once.

Outputs are allocated per call from torch's caching allocator at their exact shape (no
``cudaMalloc`` once warm): a unit's outputs outlive its next call (KV caches feed the next
step, traces keep the indices), so handing out views of one preallocated buffer per output
would let the next call overwrite them.

Without TensorRT or a GPU every entry point raises a one-line :class:`UserError` that says
what to install; ``python cli.py doctor`` lists everything at once.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visiondrop_edge.errors import UserError

from visiondrop_edge.contract import PAST_KV, QKV, PruneOutputs, bind, prune_graph

from .base import Backend, ModelSpec, group_results, run_vision_graphs

if TYPE_CHECKING:  # annotations only: TensorRT is imported lazily (plugins_trt/tests/trt_api_check.py reads them)
    import tensorrt as trt

INSTALL_TENSORRT = "pip install tensorrt-cu12 (on Jetson: JetPack's python3-libnvinfer, `sudo apt install python3-libnvinfer`)"
INSTALL_GPU = ("TensorRT needs an NVIDIA GPU that PyTorch can see (on Jetson: JetPack's PyTorch wheel; elsewhere a "
               "CUDA build of torch, `pip install torch` without the CPU constraints)")
DOCTOR = "run `python cli.py doctor` for what this machine has"


def import_tensorrt():
    """The ``tensorrt`` module, or a UserError that says how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"TensorRT is not installed for this Python: {INSTALL_TENSORRT}; {DOCTOR}") from None
    return trt


def require_gpu() -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of the current CUDA device."""
    if not torch.cuda.is_available():
        raise UserError(f"no CUDA GPU is visible to PyTorch: {INSTALL_GPU}; {DOCTOR}")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def current_environment(plugin_library: Path | None):
    """What engines built or run here are tied to (TensorRT version, GPU, plugin binary)."""
    from visiondrop_edge.manifest import sha256_file
    from visiondrop_edge.engines import Environment

    trt = import_tensorrt()
    name, capability = require_gpu()
    return Environment(trt.__version__, name, capability, sha256_file(plugin_library) if plugin_library else None)


def cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def stream_handle(device: torch.device) -> int:
    """The current torch stream's cudaStream_t: TensorRT enqueues on it, ordered with torch's work."""
    return torch.cuda.current_stream(device).cuda_stream


def synchronize(device: torch.device) -> None:
    torch.cuda.current_stream(device).synchronize()


@dataclass
class _Unit:
    """One engine: its contexts by profile name, and the graph's I/O names and dtypes in manifest order."""

    engine: trt.ICudaEngine
    contexts: dict[str, trt.IExecutionContext]
    inputs: list[str]
    input_dtypes: list[torch.dtype]
    outputs: list[str]
    output_dtypes: list[torch.dtype]
    limits: dict[str, dict[str, list[list[int]]]]  # profile -> input -> [min, opt, max] shape


class TrtBackend(Backend):
    """Runs the engines of ``engines_dir`` (built from ``artifacts_dir``, by default the recorded one)."""

    name = "trt"

    def __init__(self, engines_dir: str | Path, artifacts_dir: str | Path | None = None,
                 plugin_lib: str | Path | None = None):
        from safetensors.torch import load_file

        from visiondrop_edge.manifest import read_manifest
        from visiondrop_edge.engines import check_engine_manifest, read_engine_manifest, verify_engine_files
        from visiondrop_edge.plugins_trt.library import find_plugin_library, load_plugin_library

        trt = import_tensorrt()
        require_gpu()
        self.engines_dir = Path(engines_dir)
        data = read_engine_manifest(self.engines_dir)
        artifacts = Path(artifacts_dir or data["artifacts"]["path"])
        self.artifacts = artifacts
        self.manifest = read_manifest(artifacts)
        library = None
        if data.get("plugin_library"):
            recorded = Path(data["plugin_library"]["path"])
            library = find_plugin_library(Path(plugin_lib) if plugin_lib else (recorded if recorded.is_file() else None))
        check_engine_manifest(data, current_environment(library), artifacts)
        verify_engine_files(self.engines_dir, data)
        if library is not None:
            load_plugin_library(library)
        self.spec = ModelSpec.from_dict(self.manifest.spec)
        self.device = cuda_device()
        self.embed_table = load_file(artifacts / self.manifest.export["embed_tokens"])["weight"].to(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                        trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
                        trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
        self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.device)  # address of empty tensors
        stream = stream_handle(self.device)
        self.units: dict[str, _Unit] = {}
        scratch_sizes: list[tuple[trt.IExecutionContext, int]] = []
        for record in data["engines"]:
            entry = next(g for g in self.manifest.graphs if g.name == record["graph"])
            engine = self.runtime.deserialize_cuda_engine((self.engines_dir / record["engine"]).read_bytes())
            if engine is None:
                raise UserError(f"TensorRT could not load {record['engine']} (see its log above): rebuild with "
                                "`python cli.py build`")
            contexts = {}
            for number, profile in enumerate(record["profiles"]):
                context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                context.set_optimization_profile_async(number, stream)
                contexts[profile["name"]] = context
                scratch_sizes.append((context, engine.get_device_memory_size_for_profile_v2(number)))
            inputs, outputs = [t["name"] for t in entry.inputs], [t["name"] for t in entry.outputs]
            self.units[entry.name] = _Unit(
                engine, contexts, inputs, [self._dtypes[engine.get_tensor_dtype(n)] for n in inputs],
                outputs, [self._dtypes[engine.get_tensor_dtype(n)] for n in outputs],
                {p["name"]: p["shapes"] for p in record["profiles"]},
            )
        # Units run one after another on one stream, so every context shares one scratch buffer
        # (the largest any profile needs) instead of each holding its own activation memory.
        self._scratch = torch.empty(max([size for _, size in scratch_sizes] + [1]), dtype=torch.uint8, device=self.device)
        for context, size in scratch_sizes:
            context.set_device_memory(self._scratch.data_ptr(), size)
        self.graphs = frozenset(self.units)
        self.build = data["build"]
        synchronize(self.device)

    # ------------------------------------------------------------------ execution
    def _check_shape(self, unit: _Unit, graph: str, profile: str, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = unit.limits[profile][name]
        if any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            raise UserError.naming("{where}: {name} has shape {shape}, outside the engine's profile {low}..{high} (built with "
                                   "{max_batch} {batch} {max_seq_len} {length}): rebuild with `build` and larger limits",
                                   where=f"{graph} {profile}", name=name, shape=list(shape), low=low, high=high,
                                   batch=self.build["max_batch"], length=self.build["max_seq_len"])

    def _run(self, graph: str, profile: str, *tensors: Tensor) -> dict[str, Tensor]:
        """Bind ``tensors`` to the engine's inputs (the contract's order) and return its outputs by name."""
        unit = self.units[graph]
        context: trt.IExecutionContext = unit.contexts[profile]
        stream = stream_handle(self.device)
        staged = []  # keeps converted inputs alive until execution is enqueued (stream-ordered reuse after)
        for (name, tensor), dtype in zip(bind(unit.inputs, tensors).items(), unit.input_dtypes, strict=True):
            tensor = tensor.to(device=self.device, dtype=dtype).contiguous()
            self._check_shape(unit, graph, profile, name, tuple(tensor.shape))
            staged.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name, dtype in zip(unit.outputs, unit.output_dtypes, strict=True):
            output = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, self._address(output))
            outputs[name] = output
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT could not enqueue {graph} ({profile} profile); see its log above")
        return outputs

    def _address(self, tensor: Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    # ------------------------------------------------------------------ units
    def run_vision(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return run_vision_graphs(lambda graph, *inputs: self._run(graph, "prefill", *inputs), self.spec, pixel_values)

    def run_embed(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids.to(self.device), self.embed_table)

    def run_qkv(self, hidden_states: Tensor) -> QKV:
        """Prompts take the prefill profile; single tokens and short continuations (prefix reuse,
        chat turns) that fall below its range take the decode one."""
        low, _, high = self.units["qkv_0"].limits["prefill"]["hidden_states"]
        fits = all(lo <= size <= hi for lo, size, hi in zip(low, hidden_states.shape, high))
        return QKV(**self._run("qkv_0", "prefill" if fits else "decode", hidden_states))

    def run_prune(self, stage, hidden_states, query, key, value, attention_mask, image_offset) -> PruneOutputs:
        return PruneOutputs(**self._run(prune_graph(self.spec.schedule, stage), "prefill", hidden_states, query, key, value, attention_mask,
                                        image_offset))

    def run_group(self, group, hidden_states, query, key, value, attention_mask, position_ids, past):
        profile = "decode" if past and past[0].shape[2] > 0 else "prefill"
        outputs = self._run(f"decoder_{group}", profile, hidden_states, query, key, value, attention_mask, position_ids, *past)
        return group_results(self.spec.schedule, group, outputs)

    def cache_capacity(self, group: int, length: int) -> int:
        """Whole blocks, but never past the decode profile's longest cache (a longer one is refused there)."""
        start, _ = self.spec.schedule.layer_groups()[group]
        longest = self.units[f"decoder_{group}"].limits["decode"][f"{PAST_KV}.{start}.key"][2][2]
        return min(super().cache_capacity(group, length), max(longest, length))


# ------------------------------------------------------------------ doctor

def doctor(plugin_lib: str | Path | None = None) -> dict[str, Any]:
    """What this machine has for each piece, and what to install where something is missing."""
    from visiondrop_edge.plugins_trt import STATIC_PLUGIN_LIBRARY
    from visiondrop_edge.plugins_trt.build import find_cmake, find_nvcc

    report: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    tegra = Path("/etc/nv_tegra_release")
    # e.g. "# R36 (release), REVISION: 4.3, GCID: ..." -> "R36 (release), REVISION: 4.3" (JetPack 6.2)
    report["jetson"] = ",".join(tegra.read_text().splitlines()[0].split(",")[:2]).lstrip("# ") if tegra.is_file() else None
    report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        report["gpu"] = {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    else:
        report["gpu"] = {"missing": INSTALL_GPU}
    nvcc, cmake = find_nvcc(), find_cmake()
    report["nvcc"] = nvcc or {"missing": "install the CUDA toolkit (JetPack: `sudo apt install cuda-nvcc-12-6` on 6.x) "
                                         "to build the plugins"}
    report["cmake"] = cmake or {"missing": "apt install cmake, or pip install cmake"}
    try:
        import tensorrt as trt

        report["tensorrt"] = trt.__version__
    except ImportError:
        report["tensorrt"] = {"missing": INSTALL_TENSORRT}
    try:
        import polygraphy

        report["polygraphy"] = polygraphy.__version__
    except ImportError:
        report["polygraphy"] = {"missing": "pip install polygraphy"}
    from visiondrop_edge.plugins_trt.library import find_plugin_library

    try:
        library = find_plugin_library(Path(plugin_lib) if plugin_lib else None)
    except UserError as error:
        library, report["plugin_library"] = None, {"missing": str(error)}
    if "plugin_library" not in report:
        report["plugin_library"] = str(library) if library else {
            "missing": "build it with `python -m visiondrop_edge.plugins_trt.build --tensorrt-root DIR` (needs nvcc, cmake and the "
                       "TensorRT headers; on Jetson the JetPack headers are found), or set $VISIONDROP_TRT_PLUGINS"}
    static = library.with_name(STATIC_PLUGIN_LIBRARY) if library else None
    report["plugin_library_static"] = str(static) if static and static.is_file() else None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        report["onnxruntime"] = {"version": onnxruntime.__version__, "providers": providers}
        if "CUDAExecutionProvider" not in providers and report["gpu"].get("name"):
            report["onnxruntime"]["hint"] = "pip install onnxruntime-gpu for the CUDA provider"
    except ImportError:
        report["onnxruntime"] = {"missing": "pip install onnxruntime (or onnxruntime-gpu)"}
    report["ready_for_tensorrt"] = all(not isinstance(report[k], dict) or "missing" not in report[k]
                                       for k in ("gpu", "tensorrt", "polygraphy"))
    return report


def doctor_lines(report: dict[str, Any]) -> list[str]:
    """The report as ``name: value`` lines; missing pieces say what to install."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and "missing" in value:
            lines.append(f"{key}: MISSING - {value['missing']}")
        elif isinstance(value, dict):
            lines.append(f"{key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            lines.append(f"{key}: {value if value is not None else '-'}")
    return lines

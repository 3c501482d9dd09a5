"""A Triton model repository for the pipeline: the scale-out path (many GPUs or Jetsons behind Triton).

``visiondrop triton-repo --engines DIR --out REPO`` (or ``--artifacts DIR``) writes::

    REPO/manifest.json                   what the repository was written from (and by this tool)
    REPO/visiondrop/config.pbtxt         the model clients call: Python backend (BLS), dynamic batching
    REPO/visiondrop/1/model.py           runtime/triton_bls.py: Session + prefix cache, one BLS call per unit
    REPO/visiondrop/1/visiondrop.json    the model spec, the units' I/O, the limits and serving options
    REPO/visiondrop/1/processor/         tokenizer and image processor
    REPO/visiondrop/1/embed_tokens.safetensors
    REPO/<unit>/config.pbtxt, 1/...      one model per pipeline unit (vision_encoder, qkv_0, prune_s, decoder_g)

A unit is a TensorRT engine (``platform: tensorrt_plan``, ``--units tensorrt``), an ONNX graph on
Triton's ONNX Runtime backend (``--units onnxruntime``), or an ONNX graph on ONNX Runtime inside
the Python backend (``--units python``: runtime/triton_unit.py), for a Triton without the ONNX
Runtime backend such as the one in the ``nvidia-pytriton`` wheel. Triton then schedules every
unit itself (instances, GPUs); the BLS model keeps the orchestration, the prefix cache and the
request checks of ``serve`` (:mod:`.serve`), and answers a malformed request alone with an error.
The Python that runs the BLS model needs visiondrop-edge installed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from visiondrop_edge.contract import bind
from visiondrop_edge.errors import ArtifactError, UserError

from .base import GraphBackend, ModelSpec
from .ort_backend import session_config
from .serve import MODEL, REQUEST_INPUTS, RESPONSE_OUTPUTS, ServeOptions

REPO_FORMAT, REPO_FORMAT_VERSION = "visiondrop-edge/triton-repo", 2  # 2: the units of artifacts format 3 (qkv_0 only; decoders output next_*)
SETTINGS = "visiondrop.json"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
UNIT_RUNTIMES = ("tensorrt", "onnxruntime", "python")
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RepoOptions:
    units: str  # one of UNIT_RUNTIMES
    instances: int = 1  # of the BLS model (each keeps its own prefix cache)
    serve: ServeOptions = ServeOptions()


# ------------------------------------------------------------------ inside Triton: the units as BLS calls

UnitCall = Callable[[str, dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


class UnitBackend(GraphBackend):
    """Every unit is a named call (``call(unit, inputs, output names) -> outputs``): in the
    repository's model.py, a BLS request to that unit's Triton model."""

    name = "triton"

    def __init__(self, spec: ModelSpec, units: dict[str, dict[str, list[str]]], embed_table: Tensor, call: UnitCall):
        self.spec, self.units, self.embed_table, self.call = spec, units, embed_table, call
        self.device = torch.device("cpu")

    def _run(self, graph: str, *tensors: Tensor) -> dict[str, Tensor]:
        unit = self.units[graph]
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in bind(unit["inputs"], tensors).items()}
        return {name: torch.from_numpy(np.array(array)) for name, array in self.call(graph, feeds, unit["outputs"]).items()}


# ------------------------------------------------------------------ writing the repository


def _dims(shape: list) -> list[int]:
    return [dim if isinstance(dim, int) else -1 for dim in shape]


def _tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in entries:
        if entry["dtype"] not in TRITON_TYPES:
            raise ArtifactError(f"tensor {entry['name']} has dtype {entry['dtype']}, which Triton has no type for")
    return [{"name": e["name"], "data_type": TRITON_TYPES[e["dtype"]], "dims": _dims(e["shape"])} for e in entries]


def unit_config(entry, units: str, profiles: int = 1, parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """A unit's config: whole tensors, batch dimension included (``max_batch_size: 0``), from the BLS model."""
    config: dict[str, Any] = {"name": entry.name, "max_batch_size": 0,
                              "input": _tensors(entry.inputs), "output": _tensors(entry.outputs)}
    if units == "tensorrt":
        # Two profiles in one engine (prefill, decode) for qkv_0 and decoder units: Triton picks the one the shapes fit.
        config.update(platform="tensorrt_plan", instance_group=[{"kind": "KIND_GPU", "count": 1,
                                                                 "profile": [str(i) for i in range(profiles)]}])
    elif units == "onnxruntime":
        config.update(backend="onnxruntime", instance_group=[{"kind": "KIND_AUTO", "count": 1}])
    else:
        config.update(backend="python", instance_group=[{"kind": "KIND_CPU", "count": 1}])
    if parameters:
        config["parameters"] = {key: {"string_value": value} for key, value in parameters.items()}
    return config


def bls_config(options: RepoOptions) -> dict[str, Any]:
    """The client-facing model: the same inputs and outputs as ``serve``'s ``visiondrop``."""
    serve = options.serve

    def tensors(table):
        return [{"name": name, "data_type": kind, "dims": dims, **({"optional": True} if name == "max_new_tokens" else {})}
                for name, (kind, dims) in table.items()]

    return {"name": MODEL, "backend": "python", "max_batch_size": serve.max_batch,
            "input": tensors(REQUEST_INPUTS), "output": tensors(RESPONSE_OUTPUTS),
            "dynamic_batching": {"max_queue_delay_microseconds": serve.batch_delay_us},
            "instance_group": [{"kind": "KIND_CPU", "count": options.instances}]}


@dataclass
class Source:
    """What a repository is written from: the artifacts, and the engines when the units are TensorRT."""

    artifacts: Path
    manifest: Any  # visiondrop_edge.manifest.Manifest
    engines: Path | None = None
    engine_data: dict[str, Any] | None = None

    @property
    def limit(self) -> tuple[int, str]:
        if self.engine_data is not None:
            return self.engine_data["build"]["max_seq_len"], "the engines' maximum sequence length"
        return self.manifest.export["max_seq_len"], "the artifacts' maximum sequence length"


def open_source(artifacts: Path | None, engines: Path | None) -> Source:
    """Read (and verify) the folders a repository is written from."""
    from visiondrop_edge.manifest import read_manifest, refuse_multi_crop

    if engines is None:
        if artifacts is None:
            raise UserError.naming("give {engines} DIR (TensorRT engines from `build`) or {artifacts} DIR (ONNX graphs from `export`)")
        manifest = read_manifest(artifacts)
        refuse_multi_crop(manifest, Path(artifacts), "triton-repo", "run them with `python cli.py generate`")
        return Source(Path(artifacts), manifest)
    from visiondrop_edge.engines import ENGINES_FORMAT, ENGINES_FORMAT_VERSION, read_engine_manifest, verify_engine_files

    data = read_engine_manifest(Path(engines))
    if data.get("format") != ENGINES_FORMAT or data.get("format_version") != ENGINES_FORMAT_VERSION:
        raise UserError(f"{engines} is not a {ENGINES_FORMAT} v{ENGINES_FORMAT_VERSION} engine folder: "
                        "rebuild it with `python cli.py build`")
    verify_engine_files(Path(engines), data)
    folder = Path(artifacts or data["artifacts"]["path"])
    manifest = read_manifest(folder)
    refuse_multi_crop(manifest, folder, "triton-repo", "run them with `python cli.py generate`")
    from visiondrop_edge.manifest import MANIFEST, sha256_file

    if sha256_file(folder / MANIFEST) != data["artifacts"]["manifest_sha256"]:
        raise UserError.naming("{folder} is not the artifact folder the engines were built from (its manifest differs): "
                               "give the right one with {artifacts}, or rebuild the engines", folder=folder)
    return Source(folder, manifest, Path(engines), data)


def check_units(source: Source, units: str) -> None:
    manifest = source.manifest
    if units == "tensorrt" and source.engines is None:
        raise UserError.naming("{units} tensorrt packs TensorRT engines: give {engines} DIR (written by `build`)")
    if units != "tensorrt" and source.engines is not None:
        raise UserError.naming("{units} {chosen} runs the ONNX graphs: give {artifacts} DIR without {engines}, or use {units} tensorrt",
                               chosen=units)
    if units != "tensorrt" and manifest.export.get("mode") == "plugins":
        raise UserError.naming("plugin-mode artifacts need the TensorRT plugins: build engines and give {engines}, "
                               "or export portable graphs (without {plugins})")
    if units == "onnxruntime" and manifest.export.get("quantization"):
        raise UserError.naming("calibrated graphs need the ONNX Runtime settings recorded in their manifest, which Triton's ONNX "
                               "Runtime backend cannot take: use {units} python, or build TensorRT engines")


def write_repository(source: Source, out: Path, options: RepoOptions, force: bool = False, progress=print) -> Path:
    """Write the repository atomically (a staging folder renamed into place)."""
    from visiondrop_edge.loading import load_processor, write_atomically
    from visiondrop_edge.manifest import tool_versions

    from .serve import write_pbtxt

    check_units(source, options.units)
    manifest = source.manifest
    spec = ModelSpec.from_dict(manifest.spec)
    if spec.dtype == "bfloat16" or spec.vision_dtype == "bfloat16":
        raise UserError("bf16 graphs cannot cross Triton's Python backend (numpy has no bfloat16): export fp32 or fp16")
    processor = load_processor(source.artifacts, ArtifactError, "re-run export")
    engines = {record["graph"]: record for record in (source.engine_data or {}).get("engines", [])}
    quantization = (manifest.export.get("quantization") or {}).get("onnxruntime") or {}

    def fill(folder: Path, scratch: Path) -> None:
        bls = folder / MODEL / "1"
        bls.mkdir(parents=True)
        shutil.copyfile(HERE / "triton_bls.py", bls / "model.py")
        shutil.copyfile(source.artifacts / manifest.export["embed_tokens"], bls / "embed_tokens.safetensors")
        processor.save_pretrained(bls / "processor")
        write_pbtxt(bls_config(options), folder / MODEL / "config.pbtxt")
        units = {}
        for number, entry in enumerate(manifest.graphs, start=1):
            progress(f"[{number}/{len(manifest.graphs)}] {entry.name} ({options.units})")
            version = folder / entry.name / "1"
            version.mkdir(parents=True)
            if options.units == "tensorrt":
                record = engines[entry.name]
                shutil.copyfile(source.engines / record["engine"], version / "model.plan")
                config = unit_config(entry, "tensorrt", profiles=len(record["profiles"]))
            else:
                shutil.copyfile(source.artifacts / entry.file, version / "model.onnx")
                if entry.external_data:  # the graph names its data file: keep the name beside model.onnx
                    shutil.copyfile(source.artifacts / entry.external_data, version / entry.external_data)
                parameters = None
                if options.units == "python":
                    shutil.copyfile(HERE / "triton_unit.py", version / "model.py")
                    parameters = {"session_config": json.dumps(session_config(entry.role, quantization)),
                                  "disabled_optimizers": json.dumps(quantization.get("disabled_optimizers") or [])}
                config = unit_config(entry, options.units, parameters=parameters)
            write_pbtxt(config, folder / entry.name / "config.pbtxt")
            units[entry.name] = {"inputs": [t["name"] for t in entry.inputs], "outputs": [t["name"] for t in entry.outputs]}
        limit, limit_name = source.limit
        serve = options.serve
        settings = {
            "format": REPO_FORMAT, "format_version": REPO_FORMAT_VERSION, "spec": manifest.spec,
            "model_id": manifest.model["source"], "limit": [limit, limit_name], "units": units,
            "serve": {"max_new_tokens": serve.max_new_tokens, "max_new_tokens_limit": serve.max_new_tokens_limit,
                      "prefix_cache_bytes": serve.prefix_cache_bytes},
        }
        (bls / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        (folder / "manifest.json").write_text(json.dumps({
            "format": REPO_FORMAT, "format_version": REPO_FORMAT_VERSION, "units": options.units,
            "artifacts": str(source.artifacts.resolve()), "engines": str(source.engines.resolve()) if source.engines else None,
            "model": manifest.model, "schedule": manifest.spec["schedule"], "models": [MODEL, *units],
            "tools": tool_versions(),
        }, indent=2) + "\n")

    protect = [source.artifacts] + ([source.engines] if source.engines else [])
    return write_atomically(Path(out), fill, force=force, protect=protect)


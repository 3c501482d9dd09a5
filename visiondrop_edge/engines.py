"""The engine folder's manifest as plain data: what ``build`` writes and every runner checks.

Read by ``export.trt_build`` (which writes it) and ``runtime.trt_backend`` (which refuses
engines this machine must not run); no TensorRT import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiondrop_edge.errors import UserError
from visiondrop_edge.manifest import MANIFEST, sha256_file

ENGINES_FORMAT = "visiondrop-edge/engines"
ENGINES_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Environment:
    """What an engine is tied to: the TensorRT build, the GPU architecture and the plugin binary."""

    tensorrt: str
    gpu_name: str
    compute_capability: str  # "8.7"
    plugin_sha256: str | None = None


def check_engine_manifest(data: dict[str, Any], environment: Environment, artifacts: Path | None = None) -> None:
    """Refuse engines this machine must not run (one line each, with the fix)."""
    rebuild = "rebuild them with `python cli.py build`"
    if data.get("format") != ENGINES_FORMAT or data.get("format_version") != ENGINES_FORMAT_VERSION:
        raise UserError(f"not a {ENGINES_FORMAT} v{ENGINES_FORMAT_VERSION} engine folder: {rebuild}")
    if data["tensorrt"] != environment.tensorrt:
        raise UserError(f"the engines were built with TensorRT {data['tensorrt']}, this machine has "
                        f"{environment.tensorrt}: {rebuild} here")
    built_cc = data["gpu"]["compute_capability"]
    if built_cc != environment.compute_capability:
        raise UserError(f"the engines were built for a {data['gpu']['name']} (compute capability {built_cc}), this GPU "
                        f"is a {environment.gpu_name} ({environment.compute_capability}): {rebuild} on this GPU")
    library = data.get("plugin_library")
    if library is not None:
        if environment.plugin_sha256 is None:
            raise UserError(f"the engines need the VisionDrop plugin library ({Path(library['path']).name}), "
                            "which was not found: pass its path, or build it with `python -m visiondrop_edge.plugins_trt.build`")
        if environment.plugin_sha256 != library["sha256"]:
            raise UserError(f"the plugin library differs from the one the engines were built with "
                            f"(sha256 {environment.plugin_sha256[:12]}..., expected {library['sha256'][:12]}...): "
                            f"{rebuild}, or load the library they were built with")
    if artifacts is not None:
        artifacts = Path(artifacts)
        if sha256_file(artifacts / MANIFEST) != data["artifacts"]["manifest_sha256"]:
            raise UserError(f"{artifacts} is not the artifact folder the engines were built from (its manifest "
                            f"changed): {rebuild} from it")
        for name, expected in data["artifacts"]["sources"].items():
            path = artifacts / name
            if not path.is_file() or sha256_file(path) != expected:
                raise UserError(f"{path} changed since the engines were built: {rebuild}")


def read_engine_manifest(engines: Path) -> dict[str, Any]:
    path = Path(engines) / MANIFEST
    if not path.is_file():
        raise UserError(f"{engines} is not an engine folder (no {MANIFEST}): create one with `python cli.py build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): rebuild with `python cli.py build`") from None


def verify_engine_files(engines: Path, data: dict[str, Any]) -> None:
    for engine in data["engines"]:
        path = Path(engines) / engine["engine"]
        if not path.is_file() or sha256_file(path) != engine["sha256"]:
            raise UserError(f"{path} is missing or changed after the build: rebuild with `python cli.py build`")

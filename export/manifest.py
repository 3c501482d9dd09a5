"""``manifest.json``: how every file in an artifact folder was made, and the I/O contract.

The manifest pins the source model (content hash), the schedule, the export settings and
tool versions, every file's sha256, and each graph's input/output names, dtypes and shapes
(symbolic axes by name). Loading an artifact folder re-hashes every file, so a folder that
was edited after export is refused instead of silently running something else.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiondrop.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "visiondrop-edge/artifacts"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


@dataclass
class GraphEntry:
    """One exported graph: its role in the pipeline and its I/O contract."""

    name: str
    file: str
    role: str  # vision | qkv | prune | decoder
    index: int  # group (qkv, decoder) or LLM stage (prune); 0 for vision
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    external_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Manifest:
    model: dict[str, Any]
    spec: dict[str, Any]  # runtime.base.ModelSpec.to_dict(), schedule included
    export: dict[str, Any]
    graphs: list[GraphEntry]
    tolerances: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tools: dict[str, str] = field(default_factory=tool_versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "schedule": self.spec["schedule"],
            "spec": self.spec,
            "export": self.export,
            "graphs": [g.to_dict() for g in self.graphs],
            "tolerances": self.tolerances,
            "tools": self.tools,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            model=data["model"], spec=data["spec"], export=data["export"],
            graphs=[GraphEntry(**g) for g in data["graphs"]], tolerances=data["tolerances"],
            files=data["files"], tools=data["tools"],
        )

    def graph(self, role: str, index: int = 0) -> GraphEntry:
        for entry in self.graphs:
            if entry.role == role and entry.index == index:
                return entry
        raise KeyError(f"no {role} graph {index} in the manifest")

    def write(self, directory: Path) -> None:
        """Hash every file in ``directory`` (but the manifest) and write the manifest."""
        self.files = {
            str(p.relative_to(directory)): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST
        }
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Load an artifact folder's manifest; with ``verify``, check every file's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not an artifact folder (no {MANIFEST}): create one with `python cli.py export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg}): re-run export") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest: re-run export with this version")
    manifest = Manifest.from_dict(data)
    if verify:
        for name, expected in manifest.files.items():
            file = directory / name
            if not file.is_file():
                raise UserError(f"{file} is listed in the manifest but missing: re-run export")
            actual = sha256_file(file)
            if actual != expected:
                raise UserError(
                    f"{file} does not match the manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                    "the folder changed after export; re-run export"
                )
    return manifest

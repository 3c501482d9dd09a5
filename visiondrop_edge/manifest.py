"""``manifest.json``: how every file in an artifact folder was made, and the I/O contract.

The manifest pins the source model (content hash), the schedule, the export settings and
tool versions, every file's sha256, and each graph's input/output names, dtypes and shapes
(symbolic axes by name). Loading an artifact folder re-hashes every file, so a folder that
was edited after export is refused instead of silently running something else.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from visiondrop_edge.contract import NEW_KV, VISION_ENCODER, layout_graph, prune_graph
from visiondrop_edge.errors import ArtifactError, InputError, UserError
from visiondrop_edge.families import PromptTemplate, family_named
from visiondrop_edge.loading import sha256_file
from visiondrop_edge.schedule import CropGrid, Schedule
from visiondrop_edge.jsonio import read_json_object

MANIFEST = "manifest.json"
FORMAT = "visiondrop-edge/artifacts"
FORMAT_VERSION = 3  # 2: decoder graphs output the new tokens' keys/values only (new_key_values.*), not past + new;
# 3: every decoder graph but the last outputs the next group's first-layer q/k/v (next_*), and qkv_0 is the only qkv graph


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


# ------------------------------------------------------------------ the model facts a runtime needs
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What the orchestration needs to know about a model and schedule."""

    schedule: Schedule
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int
    image_token_id: int
    pad_token_id: int
    eos_token_id: int | None
    family: str  # the model family's registered name (visiondrop_edge.families)
    prompt: dict[str, Any]  # the PromptTemplate the model is prompted with
    dtype: str = "float32"
    vision_dtype: str | None = None  # the CLIP tower's (pixel_values'); None: dtype
    crop_layout: dict[str, Any] | None = None  # how a multi-crop family cuts images (Family.crop_layout); None: one view

    @property
    def prompt_template(self) -> PromptTemplate:
        return PromptTemplate(**self.prompt)

    def crop_grid(self, image_size: tuple[int, int]) -> CropGrid | None:
        """The views an image of ``image_size`` (height, width) is cut into: None for one view."""
        return family_named(self.family).crop_grid(self.crop_layout, image_size)

    def grid_classes(self) -> list[CropGrid]:
        """Every crop grid of this model's images (each has its own vision and prune graphs); none for one view."""
        return family_named(self.family).grid_classes(self.crop_layout)

    def graph_schedules(self) -> list[Schedule]:
        """The schedules the export has vision (and prune) graphs for (``Schedule.for_grids``)."""
        return self.schedule.for_grids(self.grid_classes())

    def for_grid(self, grid: CropGrid | None) -> ModelSpec:
        """This spec with the schedule of an image of ``grid`` (None: one view, the spec as it is)."""
        if grid is None and self.schedule.grid is None:
            return self
        if grid is None or self.schedule.grid is None:
            raise InputError(f"a {self.family} model {'cuts every image into crops' if grid is None else 'takes one view per image'}: "
                             "this image's views do not fit its schedule")
        return replace(self, schedule=self.schedule.for_grid(grid))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def vision_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.vision_dtype or self.dtype]

    @classmethod
    def from_config(
        cls, config: Any, schedule: Schedule, family: str, prompt: PromptTemplate, dtype: torch.dtype, pad_token_id: int,
        vision_dtype: torch.dtype | None = None,
    ) -> ModelSpec:
        names = {v: k for k, v in DTYPES.items()}
        text = config.text_config
        eos = text.eos_token_id
        return cls(
            schedule=schedule,
            hidden_size=text.hidden_size,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab_size=text.vocab_size,
            image_size=config.vision_config.image_size,
            image_token_id=config.image_token_id,
            pad_token_id=pad_token_id,
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            family=family,
            prompt=prompt.to_dict(),
            dtype=names[dtype],
            vision_dtype=names[vision_dtype] if vision_dtype not in (None, dtype) else None,
            crop_layout=family_named(family).crop_layout(config),
        )

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "schedule"}
        return {"schedule": self.schedule.to_dict(), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        rest = {k: v for k, v in data.items() if k != "schedule"}
        return cls(schedule=Schedule.from_dict(data["schedule"]), **rest)


# ------------------------------------------------------------------ schema
# What a manifest must look like to be read at all. Fields other modules add later are
# allowed (extra="allow") where the runtime does not read them; every field it reads is typed.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")]  # a file in the folder, no path
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[StrictInt, Field(ge=0)]
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TensorSchema(_Schema):
    name: StrictStr
    dtype: Literal[TENSOR_DTYPES]
    shape: list[Count | StrictStr]


class GraphSchema(_Schema):
    name: StrictStr
    file: FileName
    role: Literal["vision", "layout", "qkv", "prune", "decoder"]
    index: Count
    inputs: list[TensorSchema] = Field(min_length=1)
    outputs: list[TensorSchema] = Field(min_length=1)
    external_data: FileName | None = None


class StageSchema(_Schema):
    after_layer: Count
    dominant: Count
    contextual: Count


class ScheduleSchema(_Schema):
    model_config = ConfigDict(extra="allow")
    num_layers: Count
    num_patches: Count
    cls_tokens: Count = 1
    stages: list[StageSchema]


class SpecSchema(_Schema):
    model_config = ConfigDict(extra="allow")
    schedule: ScheduleSchema
    hidden_size: Count
    num_kv_heads: Count
    head_dim: Count
    vocab_size: Count
    image_size: Count
    image_token_id: Count
    pad_token_id: Count
    eos_token_id: Count | None
    family: StrictStr
    prompt: dict
    dtype: Literal["float32", "float16", "bfloat16"]


class QuantizationSchema(_Schema):
    model_config = ConfigDict(extra="allow")
    precision: StrictStr  # visiondrop_edge/gates.py refuses one it has no gates for


class ExportSchema(_Schema):
    model_config = ConfigDict(extra="allow")
    mode: Literal["portable", "plugins"]
    dtype: Literal["fp32", "fp16"]
    opset: Count
    max_seq_len: Annotated[StrictInt, Field(ge=1)]
    embed_tokens: FileName
    quantization: QuantizationSchema | None = None  # written by calibrate


class ModelSchema(_Schema):
    model_config = ConfigDict(extra="allow")
    source: StrictStr
    content_hash: Sha256


class ManifestSchema(_Schema):
    format: Literal["visiondrop-edge/artifacts"]
    format_version: Literal[3]
    model: ModelSchema
    schedule: ScheduleSchema
    spec: SpecSchema
    export: ExportSchema
    graphs: list[GraphSchema] = Field(min_length=1)
    tolerances: dict[str, Any]
    tools: dict[str, StrictStr]
    files: dict[str, Sha256] = Field(min_length=1)


def _schema_problem(error: ValidationError) -> str:
    """The first schema error as 'where: what', e.g. 'graphs.3.outputs.0.dtype: Input should be ...'."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "the top level"
    return f"{where}: {first['msg']}"


def check_consistent(manifest: Manifest) -> Schedule:
    """Check the graphs' recorded static shapes against the manifest's own schedule.

    Every visual-token count is a constant of the graphs, so a hand-edited count (in the
    schedule or in a graph's outputs) shows up as a disagreement; returns the schedule.
    """
    try:
        spec = ModelSpec.from_dict(manifest.spec)
        schedules = spec.graph_schedules()
    except UserError as exc:
        raise ValueError(f"its schedule is invalid ({exc})") from None
    schedule = spec.schedule
    groups = schedule.layer_groups()
    wanted: dict[str, dict[str, int]] = {"qkv_0": {}, **{f"decoder_{g}": {} for g in range(len(groups))}}
    def vision_counts(views: int, image_tokens: int) -> dict[str, int]:
        counts = {"image_embeds": image_tokens}
        if schedule.vision is not None:
            counts.update(kept_index=views * schedule.vision.dominant, target_index=views * schedule.vision.contextual,
                          scores=views * schedule.vision_inputs)
        return counts

    # the tower's graph runs one view per batch row; a multi-crop image's layout graph has its views' concatenated
    per_view = schedule.num_patches if schedule.is_full else schedule.vision.total
    wanted[VISION_ENCODER] = vision_counts(1, per_view if schedule.grid else schedule.image_tokens)
    for plan in schedules:  # every graph's visual-token counts on axis 1
        if plan.grid is not None:
            wanted[layout_graph(plan)] = vision_counts(plan.views, plan.image_tokens)
        for index, stage in enumerate(plan.llm_stages):
            wanted[prune_graph(plan, index)] = {"kept_index": stage.dominant, "target_index": stage.contextual,
                                                "scores": plan.stage_inputs()[index]}
    present = [g.name for g in manifest.graphs]
    if sorted(present) != sorted(wanted):
        raise ValueError(
            f"its schedule {schedule.describe()} ({len(groups)} decoder groups) does not match its graphs "
            f"(differing: {', '.join(sorted(set(present) ^ set(wanted)))}{', duplicates' if len(set(present)) != len(present) else ''})"
        )
    for entry in manifest.graphs:
        outputs = {o["name"]: o["shape"] for o in entry.outputs}
        if entry.role == "decoder":
            start, stop = groups[entry.index]
            new_key_values = [name for name in outputs if name.startswith(f"{NEW_KV}.")]
            if len(new_key_values) != 2 * (stop - start):
                raise ValueError(f"graph {entry.name} has {len(new_key_values) // 2} layers' caches but the schedule "
                                 f"gives its group layers {start + 1}..{stop}")
        for name, count in wanted[entry.name].items():
            shape = outputs.get(name)
            if shape is None or len(shape) < 2 or shape[1] != count:
                raise ValueError(f"graph {entry.name} output {name} has shape {shape}, but its schedule "
                                 f"{schedule.describe()} needs {count} tokens on axis 1")
    return schedule


@dataclass
class GraphEntry:
    """One exported graph: its role in the pipeline and its I/O contract."""

    name: str
    file: str
    role: str  # vision | layout (a multi-crop grid's) | qkv | prune | decoder
    index: int  # group (decoder; qkv_0: 0) or LLM stage (prune); 0 for vision
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
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest against :class:`ManifestSchema`; raises ``pydantic.ValidationError``."""
        parsed = ManifestSchema.model_validate(data).model_dump()
        return cls(
            model=parsed["model"], spec=parsed["spec"], export=parsed["export"],
            graphs=[GraphEntry(**g) for g in parsed["graphs"]], tolerances=parsed["tolerances"],
            files=parsed["files"], tools=parsed["tools"],
        )

    def graph(self, role: str, index: int = 0) -> GraphEntry:
        """The first graph of ``role`` and ``index`` (a multi-crop export has several vision and prune graphs: see :meth:`graph_named`)."""
        for entry in self.graphs:
            if entry.role == role and entry.index == index:
                return entry
        raise KeyError(f"no {role} graph {index} in the manifest")

    def graph_named(self, name: str) -> GraphEntry:
        for entry in self.graphs:
            if entry.name == name:
                return entry
        raise KeyError(f"no graph {name} in the manifest")

    def write(self, directory: Path) -> None:
        """Hash every file in ``directory`` (but the manifest) and write the manifest."""
        self.files = {name: sha256_file(directory / name) for name in sorted(folder_files(directory))}
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def refuse_multi_crop(manifest: Manifest, directory: Path, command: str, instead: str) -> None:
    """Refuse a multi-crop (LLaVA-NeXT) folder where ``command`` handles one view per image only."""
    if manifest.spec["schedule"].get("grid") is not None:
        raise UserError(f"{directory} holds LLaVA-NeXT (multi-crop) artifacts, which {command} does not handle yet: {instead}")


def folder_files(directory: Path) -> set[str]:
    """Every file below ``directory`` but the manifest, as manifest keys (relative paths)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Load an artifact folder's manifest and check it.

    Always: the schema, the graphs' static shapes against the schedule, and that the folder
    holds exactly the files the manifest lists (an unlisted file would be trusted without a
    hash; a missing one breaks the pipeline). With ``verify``, every file's sha256 too.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not an artifact folder (no {MANIFEST}): create one with `python cli.py export`")
    data = read_json_object(path, ArtifactError, "re-run export")
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest: re-run export with this version")
    try:
        manifest = Manifest.from_dict(data)
    except ValidationError as exc:
        raise ArtifactError(f"{path} does not follow the manifest schema ({_schema_problem(exc)}): re-run export") from None
    try:
        if any(data["schedule"][k] != data["spec"]["schedule"][k] for k in ("num_layers", "num_patches", "stages")):
            raise ValueError("its top-level schedule differs from spec.schedule")
        check_consistent(manifest)
    except ValueError as exc:
        raise ArtifactError(f"{path} contradicts itself: {exc}; the manifest was edited after export, re-run export") from None
    # (external data is not required: a weightless graph saved with external data has no such file)
    needed = {e.file for e in manifest.graphs} | {manifest.export["embed_tokens"]}
    unlisted_needed = sorted(needed - set(manifest.files))
    if unlisted_needed:
        raise ArtifactError(f"{path} uses {unlisted_needed[0]} but does not list its hash: the manifest was edited; re-run export")
    present = folder_files(directory)
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise ArtifactError(f"{directory / missing[0]} is listed in the manifest but missing: re-run export")
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise ArtifactError(
            f"{directory / unlisted[0]} is not listed in the manifest: an artifact folder holds only what export wrote; "
            "remove the file or re-run export"
        )
    if verify:
        for name, expected in manifest.files.items():
            file = directory / name
            actual = sha256_file(file)
            if actual != expected:
                raise ArtifactError(
                    f"{file} does not match the manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                    "the folder changed after export; re-run export"
                )
        for entry in manifest.graphs:
            problem = _contract_differs(directory / entry.file, entry)
            if problem:
                raise ArtifactError(f"{path} does not describe {entry.file} ({problem}): the manifest was edited; re-run export")
    return manifest


def _contract_differs(file: Path, entry: GraphEntry) -> str | None:
    """Where the graph file's own inputs/outputs (names, dtypes, shapes) differ from the manifest's.

    The file is hashed, the manifest is not: this ties the contract the runtime binds by
    name to what the graph really declares (weights stay unread: external data is skipped).
    """
    import onnx

    model = onnx.load(str(file), load_external_data=False)
    for kind, declared, recorded in (("input", model.graph.input, entry.inputs), ("output", model.graph.output, entry.outputs)):
        actual = [tensor_contract(v) for v in declared]
        if [a["name"] for a in actual] != [r["name"] for r in recorded]:
            return f"its {kind}s are {[a['name'] for a in actual]}"
        for a, r in zip(actual, recorded):
            if (a["dtype"], a["shape"]) != (r["dtype"], r["shape"]):
                return f"{kind} {a['name']} is {a['dtype']} {a['shape']}, the manifest says {r['dtype']} {r['shape']}"
    return None


def tensor_contract(value) -> dict[str, Any]:
    """A graph input/output (``onnx.ValueInfoProto``) as a manifest records it: name, dtype, shape."""
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}

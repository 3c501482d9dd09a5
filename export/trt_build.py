"""Build TensorRT engines from an artifact folder: one engine per exported graph, as exported.

Polygraphy does the TensorRT work (``NetworkFromOnnxPath`` strongly typed, ``CreateConfig``
with ``Profile`` s, ``EngineFromNetwork``, ``SaveEngine``): precision comes from the graphs
(fp32/fp16 export, Q/DQ), never from builder precision flags, which TensorRT 11 removed.

Optimization profiles come from the manifest's I/O contract (its named dynamic axes), the
schedule and three numbers: ``max_batch``, ``max_seq_len`` (prompt + generated tokens, the
exported one by default) and ``opt_seq_len`` (a typical prompt, image tokens included).
``qkv_0`` and ``decoder_{g}`` run in prefill (a whole prompt, empty cache) and in decode (one
token, a long cache), so their engines get two profiles, ``prefill`` and ``decode``, in one
engine: the weights are stored once and the runtime picks a profile per call. The vision,
layout and prune graphs run once per request: one ``prefill`` profile. A multi-crop
(LLaVA-NeXT) folder's shared graphs get ranges that hold every grid class, and its
``vision_encoder`` one view per batch row (up to ``max_batch`` times the largest grid's views).

Everything but :func:`build_engines` is plain data (no TensorRT): the plan that ``--dry-run``
prints, the kernel-limit refusals, the engine manifest and its refusals (another TensorRT
version, GPU architecture or plugin build; changed source artifacts).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx

from visiondrop_edge.contract import layout_graph, prune_graph
from visiondrop_edge.manifest import MANIFEST, GraphEntry, ModelSpec, read_manifest, sha256_file
from visiondrop_edge.engines import ENGINES_FORMAT, ENGINES_FORMAT_VERSION, Environment
from visiondrop_edge.plugins_trt import DEFAULT_BUILD_DIR, MERGE_OP, PLUGIN_LIBRARY, PLUGIN_VERSION, SELECT_OP, is_plugin_node
from visiondrop_edge.plugins_trt.library import find_plugin_library, load_plugin_library
from visiondrop_edge.errors import SettingError, UserError
from visiondrop_edge.schedule import Schedule

if TYPE_CHECKING:  # annotations only: TensorRT is imported lazily (plugins_trt/tests/trt_api_check.py reads them)
    import tensorrt as trt

ENGINE_SUFFIX = ".engine"
# The kernels' limits (plugins_trt/include/visiondrop_kernels.h): refused at build time.
MAX_TOKENS = 4096  # select's N and merge's R
MAX_METRIC = 256  # merge's metric width M
B, SEQ, PAST, TOTAL, PRUNED = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length", \
    "pruned_sequence_length"
ONNX_ITEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                   onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
                   onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1,
                   onnx.TensorProto.FLOAT8E4M3FN: 1}


@dataclass(frozen=True)
class BuildOptions:
    """What the profiles are sized for (None: the artifacts' exported max_seq_len / a typical prompt)."""

    max_batch: int = 1
    max_seq_len: int | None = None
    opt_seq_len: int | None = None
    plugin_lib: Path | None = None
    timing_cache: Path | None = None


@dataclass
class Profile:
    """One optimization profile: [min, opt, max] per dynamic axis, and the resulting input shapes."""

    name: str  # prefill | decode
    axes: dict[str, list[int]]
    shapes: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max] shapes


@dataclass
class EnginePlan:
    graph: str
    role: str
    index: int
    source: str  # the ONNX file, relative to the artifacts
    engine: str  # the engine file, relative to the engines folder
    profiles: list[Profile]
    weight_bytes: int
    plugin_nodes: list[str]


@dataclass
class BuildPlan:
    artifacts: Path
    options: BuildOptions
    max_seq_len: int
    opt_seq_len: int
    engines: list[EnginePlan]
    needs_plugins: bool  # plugin-mode artifacts
    plugin_library: Path | None  # the library found for them (None: not found, or not needed)

    def require_plugin_library(self) -> None:
        if self.needs_plugins and self.plugin_library is None:
            raise UserError.naming("{artifacts} uses the VisionDrop plugins: build {library} with "
                                   "`python -m visiondrop_edge.plugins_trt.build` (or pass {plugin_lib} PATH)",
                                   artifacts=self.artifacts, library=PLUGIN_LIBRARY)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON, with the trtexec / polygraphy cross-check command of every engine profile."""
        engines = []
        for engine in self.engines:
            record = asdict(engine)
            for profile, data in zip(engine.profiles, record["profiles"]):
                data["cross_check"] = cross_check_commands(self, engine, profile)
            engines.append(record)
        return {
            "artifacts": str(self.artifacts), "max_batch": self.options.max_batch, "max_seq_len": self.max_seq_len,
            "opt_seq_len": self.opt_seq_len, "needs_plugins": self.needs_plugins,
            "plugin_library": str(self.plugin_library) if self.plugin_library else None,
            "timing_cache": str(self.options.timing_cache) if self.options.timing_cache else None,
            "engines": engines,
        }


# Values that keep the integer inputs of random cross-check data meaningful (a real mask,
# the image right after the first token, positions inside the model's range).
CROSS_CHECK_VALUES = {"attention_mask": "[1,1]", "image_offset": "[1,1]", "position_ids": "[0,64]"}


def cross_check_commands(plan: BuildPlan, engine: EnginePlan, profile: Profile) -> dict[str, str | None]:
    """``trtexec`` (build + time this graph alone) and ``polygraphy run --trt --onnxrt`` (TensorRT
    against ONNX Runtime on random inputs at the profile's opt shapes; None for plugin graphs,
    which ONNX Runtime cannot run as they are: `validate --candidate trt` checks those)."""
    source = plan.artifacts / engine.source

    def joined(which: int, sep: str, fmt) -> str:
        return sep.join(f"{name}:{fmt(shapes[which])}" for name, shapes in profile.shapes.items())

    dims = lambda shape: "x".join(map(str, shape))  # noqa: E731
    listed = lambda shape: "[" + ",".join(map(str, shape)) + "]"  # noqa: E731
    library = plan.plugin_library or DEFAULT_BUILD_DIR / PLUGIN_LIBRARY
    plugins = f" --dynamicPlugins={library}" if engine.plugin_nodes else ""
    trtexec = (f"trtexec --onnx={source} --stronglyTyped{plugins} --minShapes={joined(0, ',', dims)} "
               f"--optShapes={joined(1, ',', dims)} --maxShapes={joined(2, ',', dims)}")
    if engine.plugin_nodes:
        return {"trtexec": trtexec, "polygraphy": None}
    ranges = " ".join(f"{name}:{value}" for name, value in CROSS_CHECK_VALUES.items() if name in profile.shapes)
    polygraphy = (f"polygraphy run {source} --trt --onnxrt --strongly-typed "
                  f"--trt-min-shapes {joined(0, ' ', listed)} --trt-opt-shapes {joined(1, ' ', listed)} "
                  f"--trt-max-shapes {joined(2, ' ', listed)} --input-shapes {joined(1, ' ', listed)}"
                  + (f" --val-range {ranges}" if ranges else ""))
    return {"trtexec": trtexec, "polygraphy": polygraphy}


# ------------------------------------------------------------------ profiles (plain data)

def sequence_ranges(schedule: Schedule, max_seq_len: int, opt_seq_len: int) -> list[tuple[int, int, int]]:
    """[min, opt, max] prompt length seen by each decoder group (after the prune before it).

    A prompt holds the image tokens and at least one text token; the longest one leaves room
    for one generated token. Group g sees the prompt minus the visual tokens dropped before it.
    """
    image = schedule.image_tokens
    return [(v + 1, opt_seq_len - (image - v), max_seq_len - 1 - (image - v)) for v in schedule.group_tokens()]


def _range(low: int, opt: int, high: int) -> list[int]:
    return [low, min(max(opt, low), high), high]


def graph_schedules(entry: GraphEntry, plans: list[Schedule]) -> list[Schedule]:
    """Of the export's ``plans`` (``ModelSpec.graph_schedules``, the spec's own first), those
    whose images ``entry`` runs for: every grid class for the shared graphs (vision encoder,
    qkv_0, decoder), its grid class for a layout graph, its block size's for a prune."""
    if entry.role == "layout":
        plans = [plan for plan in plans if layout_graph(plan) == entry.name]
    elif entry.role == "prune":
        plans = [plan for plan in plans if prune_graph(plan, entry.index) == entry.name]
    if not plans:
        raise UserError(f"manifest graph {entry.name} belongs to none of the artifacts' crop grids: re-run export")
    return plans


def profiles_for(entry: GraphEntry, schedules: list[Schedule], max_batch: int, max_seq_len: int, opt_seq_len: int) -> list[Profile]:
    """The optimization profiles of one graph, from its role and the lengths of the
    ``schedules`` it runs for (:func:`graph_schedules`): ranges that hold every one of them,
    opt at the first one's with ``opt_seq_len`` (a multi-crop image's other grids hold the
    same text around fewer image tokens). The vision encoder runs one view per batch row."""
    first = schedules[0]
    per_schedule = [sequence_ranges(s, max_seq_len, opt_seq_len - first.image_tokens + s.image_tokens) for s in schedules]
    lengths = [(min(r[g][0] for r in per_schedule), per_schedule[0][g][1], max(r[g][2] for r in per_schedule))
               for g in range(len(per_schedule[0]))]
    batch = [1, 1, max_batch]
    if entry.role == "vision":
        views = [s.views for s in schedules]
        profiles = [Profile("prefill", {B: [min(views), first.views, max_batch * max(views)]})]
    elif entry.role == "layout":
        profiles = [Profile("prefill", {B: batch})]
    elif entry.role == "prune":  # runs on group (index + 1)'s input: the sequence group `index` saw
        profiles = [Profile("prefill", {B: batch, SEQ: _range(*lengths[entry.index])})]
    elif entry.role in ("qkv", "decoder"):
        # qkv_0 and decoder_g run on group g's sequence (decoder_g projects group g + 1's q/k/v
        # on it, before the prune in front of that group).
        own = lengths[entry.index]
        past = _range(*own)  # decode: the cache holds at least the shortest prompt
        profiles = [
            Profile("prefill", {B: batch, SEQ: _range(*own), PAST: [0, 0, 0], TOTAL: _range(*own)}),
            # decode: one token on a cache, or a few (a question on a reused prefix, a chat turn):
            # sequence up to the longest prompt on a cache buffer up to the longest (the runtime's
            # buffers are whole blocks, so a buffer plus a continuation may pass the longest
            # conversation; total only sizes the attention mask).
            Profile("decode", {B: batch, SEQ: [1, 1, own[2]], PAST: past, TOTAL: [past[0] + 1, past[1] + 1, past[2] + own[2]]}),
        ]
    else:
        raise UserError(f"manifest graph {entry.name} has an unknown role '{entry.role}': re-run export")
    used = {dim for tensor in entry.inputs for dim in tensor["shape"] if isinstance(dim, str)}
    for profile in profiles:
        for tensor in entry.inputs:
            profile.shapes[tensor["name"]] = [_resolve(tensor["shape"], profile.axes, i, tensor["name"], entry.name)
                                              for i in range(3)]
        profile.axes = {axis: values for axis, values in profile.axes.items() if axis in used}
    return profiles


def _resolve(shape: list, axes: dict[str, list[int]], which: int, tensor: str, graph: str) -> list[int]:
    resolved = []
    for dim in shape:
        if isinstance(dim, str):
            if dim not in axes:
                raise UserError(f"{graph} input {tensor} has dynamic axis '{dim}' that no profile covers: re-run export")
            resolved.append(axes[dim][which])
        else:
            resolved.append(int(dim))
    return resolved


def output_max_shapes(entry: GraphEntry, profile: Profile, schedule: Schedule) -> dict[str, list[int]]:
    """Largest shape of every output under ``profile`` (what the runtime preallocates or checks)."""
    axes = {name: values[2] for name, values in profile.axes.items()}
    if entry.role == "prune":  # the pruned sequence drops this stage's visual tokens
        axes[PRUNED] = axes[SEQ] - (schedule.stage_inputs()[entry.index] - schedule.llm_stages[entry.index].total)
    return {t["name"]: [axes[d] if isinstance(d, str) else int(d) for d in t["shape"]] for t in entry.outputs}


# ------------------------------------------------------------------ graphs (plain data)

def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers, external data included, computed from dims and types."""
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count * ONNX_ITEM_BYTES.get(tensor.data_type, 4)
    return total


def kernel_limit_problems(model: onnx.ModelProto, graph: str) -> list[str]:
    """Plugin nodes whose sizes the CUDA kernels cannot run (N, R <= 4096, M <= 256).

    Sizes are those of each select's inputs (scores [B,N], metric [B,N,M]): the graph's own
    outputs of those names in export's contract, else ONNX shape inference; a merge's R is its
    select's N - k.
    """
    plugin_nodes = [n for n in model.graph.node if is_plugin_node(n)]
    if not plugin_nodes:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    rest_counts = {}  # select's rest_metric output -> (R, M)
    problems = []
    for node in plugin_nodes:
        if node.op_type == SELECT_OP:  # inputs: scores [B,N], tokens [B,N,D], metric [B,N,M]
            k = next(a.i for a in node.attribute if a.name == "k")
            n = (shapes.get(node.input[0]) or [None, None])[1]
            m = (shapes.get(node.input[2]) or [None, None, None])[2]
            if n is None or m is None:
                problems.append(f"{graph}: the sizes of {SELECT_OP} node '{node.name}' are not static; re-run export")
                continue
            if n > MAX_TOKENS:
                problems.append(f"{graph}: {SELECT_OP} over N={n} tokens (the kernel takes N <= {MAX_TOKENS})")
            rest_counts[node.output[2]] = (n - k, m)
        elif node.input[1] in rest_counts:  # merge inputs: rest_tokens [B,R,D], rest_metric [B,R,M]
            r, m = rest_counts[node.input[1]]
            if r > MAX_TOKENS:
                problems.append(f"{graph}: {MERGE_OP} over R={r} tokens (the kernel takes R <= {MAX_TOKENS})")
            if m > MAX_METRIC:
                problems.append(f"{graph}: {MERGE_OP} metric width M={m} (the kernel takes M <= {MAX_METRIC})")
        else:
            problems.append(f"{graph}: {MERGE_OP} node '{node.name}' is not fed by a {SELECT_OP}; re-run export")
    return problems


def plan_build(artifacts: Path, options: BuildOptions) -> BuildPlan:
    """What ``build`` will do, without TensorRT: engines, profiles, weights, plugin library; refusals first."""
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    spec = ModelSpec.from_dict(manifest.spec)
    schedule = spec.schedule
    exported_max = int(manifest.export.get("max_seq_len") or 2048)
    max_seq_len = options.max_seq_len or exported_max
    plans = sorted(spec.graph_schedules(), key=lambda plan: plan != schedule)  # the spec's own (NeXT: the 2x2 grid) first
    image_tokens = max(plan.image_tokens for plan in plans)  # a multi-crop model's largest grid
    shortest = image_tokens + 2  # the image, one text token, one generated token
    if options.max_batch < 1:
        raise SettingError(f"{{max_batch}} {options.max_batch}: use 1 or more")
    if max_seq_len < shortest:
        raise SettingError(f"{{max_seq_len}} {max_seq_len} cannot hold the {image_tokens} image tokens and a "
                           f"prompt: use at least {shortest}")
    if max_seq_len > exported_max:
        raise SettingError(f"{{max_seq_len}} {max_seq_len} is past the {exported_max} the artifacts were exported for: "
                           f"re-export with {{max_seq_len}} {max_seq_len}, or build with at most {exported_max}")
    opt_seq_len = options.opt_seq_len or min(max_seq_len - 1, schedule.image_tokens + 32)
    if not schedule.image_tokens + 1 <= opt_seq_len <= max_seq_len - 1:
        raise SettingError(f"{{opt_seq_len}} {opt_seq_len} must lie between {schedule.image_tokens + 1} (the image and one token) "
                           f"and {{max_seq_len}} - 1 = {max_seq_len - 1}")
    plugins = manifest.export.get("mode") == "plugins"
    library = find_plugin_library(options.plugin_lib) if plugins or options.plugin_lib else None  # a bad path: refused
    engines, problems = [], []
    for entry in manifest.graphs:
        model = onnx.load(str(artifacts / entry.file), load_external_data=False)
        problems += kernel_limit_problems(model, entry.name)
        served = graph_schedules(entry, plans)
        engines.append(EnginePlan(
            graph=entry.name, role=entry.role, index=entry.index, source=entry.file, engine=entry.name + ENGINE_SUFFIX,
            profiles=profiles_for(entry, served, options.max_batch, max_seq_len, opt_seq_len - schedule.image_tokens + served[0].image_tokens),
            weight_bytes=weight_bytes(model), plugin_nodes=[n.op_type for n in model.graph.node if is_plugin_node(n)],
        ))
    if problems:
        raise UserError("shapes past the VisionDrop kernels' limits: " + "; ".join(problems)
                        + " (use a smaller budget or image grid, or the portable export without --plugins)")
    return BuildPlan(artifacts, options, max_seq_len, opt_seq_len, engines, plugins, library if plugins else None)


# ------------------------------------------------------------------ engine manifest (plain data)

def engine_manifest(plan: BuildPlan, environment: Environment, flags: dict[str, list[str]],
                    engine_hashes: dict[str, str]) -> dict[str, Any]:
    """The engines folder's manifest.json: what was built, from what, for what."""
    artifacts_manifest = plan.artifacts / MANIFEST
    sources = {}
    manifest = read_manifest(plan.artifacts, verify=False)
    for entry in manifest.graphs:
        for name in filter(None, [entry.file, entry.external_data]):
            sources[name] = manifest.files[name]
    library = plan.plugin_library
    return {
        "format": ENGINES_FORMAT, "format_version": ENGINES_FORMAT_VERSION,
        "tensorrt": environment.tensorrt,
        "gpu": {"name": environment.gpu_name, "compute_capability": environment.compute_capability},
        "plugin_library": None if library is None else {
            "path": str(library), "sha256": environment.plugin_sha256, "version": PLUGIN_VERSION,
        },
        "artifacts": {"path": str(plan.artifacts.resolve()), "manifest_sha256": sha256_file(artifacts_manifest),
                      "sources": sources},
        "build": {"max_batch": plan.options.max_batch, "max_seq_len": plan.max_seq_len, "opt_seq_len": plan.opt_seq_len,
                  "flags": flags, "timing_cache": str(plan.options.timing_cache) if plan.options.timing_cache else None},
        "engines": [{**asdict(e), "sha256": engine_hashes[e.engine]} for e in plan.engines],
    }


# ------------------------------------------------------------------ building (TensorRT)

def build_engines(plan: BuildPlan, out: Path, environment: Environment, force: bool = False,
                  progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Build every engine of ``plan`` into ``out`` atomically; returns the engine manifest."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    from visiondrop_edge.loading import write_atomically

    plan.require_plugin_library()
    if plan.plugin_library is not None:
        how = load_plugin_library(plan.plugin_library)
        progress(f"loaded {plan.plugin_library} ({how})")
    flags: dict[str, list[str]] = {"network": ["STRONGLY_TYPED"], "builder": []}
    hashes: dict[str, str] = {}

    def config_for(profiles: list[Profile]):
        polygraphy_profiles = []
        for profile in profiles:
            made = PolygraphyProfile()
            for name, (low, opt, high) in profile.shapes.items():
                made.add(name, min=low, opt=opt, max=high)
            polygraphy_profiles.append(made)
        create = CreateConfig(profiles=polygraphy_profiles, load_timing_cache=_existing(plan.options.timing_cache))

        def config(builder: trt.Builder, network: trt.INetworkDefinition) -> trt.IBuilderConfig:
            built: trt.IBuilderConfig = create(builder, network)
            flags["builder"] = sorted(name for name, flag in trt.BuilderFlag.__members__.items() if built.get_flag(flag))
            return built

        return config

    def fill(folder: Path, scratch: Path | None = None) -> None:
        for number, engine in enumerate(plan.engines, 1):
            started = time.monotonic()
            progress(f"[{number}/{len(plan.engines)}] building {engine.engine} from {engine.source} "
                     f"({', '.join(p.name for p in engine.profiles)}; {engine.weight_bytes / 2**20:.1f} MB weights) ...")
            network = NetworkFromOnnxPath(str(plan.artifacts / engine.source), strongly_typed=True)
            timing = str(plan.options.timing_cache) if plan.options.timing_cache else None
            SaveEngine(EngineFromNetwork(network, config_for(engine.profiles), save_timing_cache=timing),
                       str(folder / engine.engine))()
            hashes[engine.engine] = sha256_file(folder / engine.engine)
            progress(f"    {engine.engine}: {(folder / engine.engine).stat().st_size / 2**20:.1f} MB "
                     f"in {time.monotonic() - started:.0f} s")
        manifest = engine_manifest(plan, environment, flags, hashes)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    write_atomically(out, fill, force=force)
    return json.loads((Path(out) / MANIFEST).read_text())


def _existing(path: Path | None) -> str | None:
    return str(path) if path and Path(path).is_file() else None


def default_engines_dir(artifacts: Path) -> Path:
    return Path("engines") / Path(artifacts).resolve().name


def describe_plan(plan: BuildPlan) -> list[list[str]]:
    """Rows of the dry-run table: engine, profiles (axis min/opt/max), weights, plugins."""
    rows = []
    for engine in plan.engines:
        for number, profile in enumerate(engine.profiles):
            axes = " ".join(f"{_short(a)}={lo}/{opt}/{hi}" for a, (lo, opt, hi) in profile.axes.items())
            rows.append([engine.engine if number == 0 else "", profile.name, axes,
                         f"{engine.weight_bytes / 2**20:.2f} MB" if number == 0 else "",
                         ",".join(engine.plugin_nodes) if number == 0 else ""])
    return rows


def _short(axis: str) -> str:
    return {B: "batch", SEQ: "seq", PAST: "past", TOTAL: "total"}.get(axis, axis)

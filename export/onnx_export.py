"""Export a LLaVA checkpoint + schedule to fixed-budget ONNX graphs.

One graph per pipeline unit (see ``visiondrop/modules.py``): ``vision_encoder`` (stage-0
prune inside), ``qkv_0`` (the first decoder layer up to its q/k/v, before RoPE), and per
decoder group ``g`` a ``decoder_{g}`` graph (the rest of its first layer, its other layers,
then the next group's first-layer q/k/v; the last one ends in the LM head), with a weightless
``prune_{s}`` graph before every group but the first. Every weight is stored once on disk and
loaded once: prefill and decode run the same graphs, and the prune scores with the q/k that
the group before it computes on the unpruned sequence.

Only batch, sequence and past lengths are dynamic axes; every visual-token count is a
constant. Graphs are opset 17 / IR version 10 (what TensorRT 10.3 on JetPack 6 parses) and
use external data once a graph's weights pass 2 GB.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import onnx
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from visiondrop_edge.plugins_trt import MERGE_OP, PLUGIN_DOMAIN, PLUGIN_LIBRARY, PLUGIN_NAMESPACE, PLUGIN_VERSION, SELECT_OP, is_plugin_node
from visiondrop_edge.plugins_trt.onnx_ops import PLUGIN_OPS
from visiondrop_edge.errors import SettingError
from visiondrop_edge.gates import gates_for
from visiondrop_edge.contract import (PRUNE_INPUTS, PRUNE_OUTPUTS, QKV_INPUTS, QKV_OUTPUTS, VISION_ENCODER, VISION_INPUTS, bind, decoder_inputs,
                                      decoder_outputs, dynamic_axes, layout_graph, layout_inputs, prune_graph, vision_outputs)
from visiondrop_edge.loading import EXPORT_DTYPES, LoadedModel, parameter_dtype, write_atomically
from visiondrop_edge.manifest import GraphEntry, Manifest, ModelSpec, tensor_contract
from visiondrop_edge.modules import VisionDropPipeline
from visiondrop_edge.prompt import pad_token_id
from visiondrop_edge.pruning import REFERENCE_OPS
from visiondrop_edge.schedule import Schedule

from .graph_checks import data_dependent_shapes, undocumented_types
from .shapes import derived_graph

EMBED_FILE = "embed_tokens.safetensors"
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom for the graph itself

@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    vision_dtype: str | None = None  # CLIP tower + stage-0 prune; None: the same as dtype
    opset: int = 17
    ir_version: int = 10
    max_seq_len: int = 2048
    external_data: str = "auto"  # auto (over 2 GB of weights) | always
    plugins: bool = False  # select/merge as TensorRT plugin nodes instead of standard ops

    def __post_init__(self):
        if self.dtype not in EXPORT_DTYPES:
            raise SettingError(f"{{dtype}} {self.dtype} is not supported: use fp32 or fp16")
        if self.vision_dtype not in (None, *EXPORT_DTYPES):
            raise SettingError(f"{{vision_dtype}} {self.vision_dtype} is not supported: use fp32 or fp16")
        if self.vision_dtype == self.dtype:  # one spelling of "the same precision" in manifests
            object.__setattr__(self, "vision_dtype", None)
        if self.opset < 17:
            raise SettingError(f"{{opset}} {self.opset} is too old: the graphs need opset 17 or newer")


@dataclass
class GraphSpec:
    """A unit to trace: example inputs by name, output names, and the dynamic axes."""

    name: str
    role: str
    index: int
    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    prunes: bool = False  # holds select/merge ops (plugin nodes in plugin mode)


def graph_specs(pipelines: list[VisionDropPipeline], spec: ModelSpec) -> list[GraphSpec]:
    """Every graph of the pipelines with example inputs (batch 2, so no axis specialises); names
    and dynamic axes from :mod:`visiondrop_edge.contract`.

    One pipeline per schedule of :meth:`ModelSpec.graph_schedules`, over the same weights. The
    weighted graphs come once, from the first: ``vision_encoder`` (for a multi-crop model, the
    per-view unit: one view per batch row), ``qkv_0`` and the decoder graphs, whose shapes no grid
    fixes. Each multi-crop grid class adds its weightless layout graph and its prune graphs
    (once per name: block sizes repeat across grids).
    """
    dtype = spec.torch_dtype
    heads, kv_heads, head_dim, hidden = pipelines[0].config.text_config.num_attention_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    batch = 2
    size = spec.image_size
    graphs: dict[str, GraphSpec] = {}
    prunes: dict[str, GraphSpec] = {}  # in the pipeline order: qkv_0, then per group g the prunes before it and decoder_g
    outputs = vision_outputs(not spec.schedule.is_full)
    pixels = torch.randn(batch, 3, size, size, dtype=spec.vision_torch_dtype)
    tower = pipelines[0].vision.per_view if spec.schedule.grid else pipelines[0].vision  # a multi-crop image: one view per row
    graphs[VISION_ENCODER] = GraphSpec(VISION_ENCODER, "vision", 0, tower, bind(VISION_INPUTS, [pixels]), list(outputs),
                                       dynamic_axes("vision", VISION_INPUTS + outputs), prunes=not spec.schedule.is_full)
    for pipeline in pipelines:
        schedule = pipeline.schedule
        if schedule.grid is not None:  # the grid's layout, on the tower's outputs for an image of its views
            with torch.no_grad():
                views = tower(torch.randn(batch * schedule.views, 3, size, size, dtype=spec.vision_torch_dtype))
            name = layout_graph(schedule)
            inputs = layout_inputs(not schedule.is_full)
            graphs[name] = GraphSpec(name, "layout", 0, pipeline.vision.layout,
                                     bind(inputs, [t.unflatten(0, (batch, schedule.views)) for t in views]),
                                     list(outputs), dynamic_axes("layout", inputs + outputs))
        for index, prune in enumerate(pipeline.prunes):
            seq = schedule.stage_inputs()[index] + 9
            mask = torch.ones(batch, seq, dtype=torch.int64)
            mask[0, :2] = 0
            name = prune_graph(schedule, index)
            prunes.setdefault(name, GraphSpec(
                name, "prune", index, prune,
                bind(PRUNE_INPUTS, [torch.randn(batch, seq, hidden, dtype=dtype),
                                    torch.randn(batch, heads, seq, head_dim, dtype=dtype),
                                    torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype),
                                    torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype),
                                    mask, torch.tensor([4, 3])]),
                list(PRUNE_OUTPUTS), dynamic_axes("prune", PRUNE_INPUTS + PRUNE_OUTPUTS), prunes=True,
            ))
    shared = pipelines[0]
    groups = shared.schedule.layer_groups()
    graphs["qkv_0"] = GraphSpec(
        "qkv_0", "qkv", 0, shared.qkv, bind(QKV_INPUTS, [torch.randn(batch, 7, hidden, dtype=dtype)]),
        list(QKV_OUTPUTS), dynamic_axes("qkv", QKV_INPUTS + QKV_OUTPUTS),
    )
    for g, (start, stop) in enumerate(groups):
        graphs.update((name, prune) for name, prune in prunes.items() if prune.index == g - 1)
        seq, past = 5, 3
        layers = range(start, stop)
        inputs = decoder_inputs(layers)
        examples = [
            torch.randn(batch, seq, hidden, dtype=dtype),
            torch.randn(batch, heads, seq, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype),
            torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype),
            torch.ones(batch, past + seq, dtype=torch.int64),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        ] + [torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * len(layers))]
        outputs = decoder_outputs(layers, last=g == len(groups) - 1)
        graphs[f"decoder_{g}"] = GraphSpec(f"decoder_{g}", "decoder", g, shared.groups[g], bind(inputs, examples),
                                           list(outputs), dynamic_axes("decoder", inputs + outputs))
    return list(graphs.values())


def _finalize(model: onnx.ModelProto, graph: GraphSpec, reference: tuple[Tensor, ...], options: ExportOptions, metadata: dict[str, str]) -> onnx.ModelProto:
    """Declare the inputs by the contract, fold the graph and derive its output shapes (checked
    against the traced outputs and the contract, see :mod:`.shapes`)."""
    model.ir_version = options.ir_version
    model.producer_name, model.producer_version = "visiondrop-edge", "0.1.0"
    for value in model.graph.input:
        axes = graph.dynamic.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for axis, (dim, size) in enumerate(zip(dims, graph.inputs[value.name].shape, strict=True)):
            dim.Clear()
            if axis in axes:
                dim.dim_param = axes[axis]
            else:
                dim.dim_value = size
    declared = {value.name: (list(tensor.shape), graph.dynamic.get(value.name, {}))
                for value, tensor in zip(model.graph.output, reference, strict=True)}
    model = derived_graph(model, declared)
    # Keep only the plugin-node outputs' types and shapes: ONNX's own shape inference cannot know them.
    plugin_outputs = {o for n in model.graph.node if is_plugin_node(n) for o in n.output}
    kept = [v for v in model.graph.value_info if v.name in plugin_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.helper.set_model_props(model, metadata)
    return model


@contextmanager
def understood_warnings() -> Iterator[None]:
    """Hide the tracer's warnings that are known to be harmless here, and only those."""
    with warnings.catch_warnings():
        # Python branches on traced sizes that the budget fixes (the contextual targets' stride, a
        # stage without members), CLIP's check of its fixed image size, and HF's SDPA choosing
        # is_causal from CLIP's fixed query length: specialising the trace on them is the intended
        # static graph. A TracerWarning from anywhere else still shows.
        for module in (r"visiondrop_edge\.pruning", r"transformers\.models\.clip\.modeling_clip", r"transformers\.integrations\.sdpa_attention"):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=module)
        # The TorchScript exporter on purpose (dynamo=False): plugin nodes are autograd-Function
        # symbolics, which the torch.export-based exporter does not take.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning, module=r"torch\.onnx")
        yield


def export_graph(graph: GraphSpec, directory: Path, scratch: Path, options: ExportOptions, metadata: dict[str, str]) -> GraphEntry:
    """Trace one unit to ``directory/<name>.onnx`` and check it."""
    args = tuple(graph.inputs.values())
    with torch.no_grad():
        reference = graph.module(*args)
    reference = (reference,) if isinstance(reference, Tensor) else tuple(reference)
    traced = scratch / graph.name / f"{graph.name}.onnx"
    traced.parent.mkdir(parents=True)
    with understood_warnings():
        torch.onnx.export(
            graph.module, args, str(traced), dynamo=False, opset_version=options.opset,
            input_names=list(graph.inputs), output_names=graph.outputs, dynamic_axes=graph.dynamic,
            do_constant_folding=True, custom_opsets={PLUGIN_DOMAIN: 1} if options.plugins and graph.prunes else None,
        )
    model = _finalize(onnx.load(str(traced)), graph, reference, options, metadata)
    problems = data_dependent_shapes(model)
    if problems:
        raise RuntimeError(f"{graph.name} is not static-shaped: " + "; ".join(problems))
    problems = undocumented_types(model)
    if problems:
        raise RuntimeError(f"{graph.name} uses types TensorRT's parser does not document: " + "; ".join(problems))
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    target = directory / f"{graph.name}.onnx"
    external = options.external_data == "always" or weights > EXTERNAL_DATA_BYTES
    data_name = f"{graph.name}.onnx.data" if external else None
    onnx.save_model(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(target), full_check=True)  # by path: works past 2 GB; runs shape inference too
    return GraphEntry(
        name=graph.name, file=target.name, role=graph.role, index=graph.index,
        inputs=[tensor_contract(v) for v in model.graph.input], outputs=[tensor_contract(v) for v in model.graph.output],
        external_data=data_name,
    )


def export_artifacts(
    loaded: LoadedModel, schedule: Schedule, out: Path, options: ExportOptions, force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> Manifest:
    """Write the whole artifact folder atomically (temp folder, then rename)."""
    dtype = EXPORT_DTYPES[options.dtype]
    vision_dtype = EXPORT_DTYPES[options.vision_dtype or options.dtype]
    model = loaded.model
    family = loaded.family
    if (parameter_dtype(family.decoder(model).layers), parameter_dtype(family.tower_parameters(model))) != (dtype, vision_dtype):
        raise ValueError(f"load the model with the export's precision policy first (see apply_precision): {options}")
    text = loaded.config.text_config
    if options.max_seq_len > text.max_position_embeddings:
        raise SettingError(f"{{max_seq_len}} {options.max_seq_len} exceeds the model's {text.max_position_embeddings} positions")
    spec = ModelSpec.from_config(loaded.config, schedule, family.name, loaded.template, dtype, pad_token_id(loaded.tokenizer), vision_dtype)
    schedules = spec.graph_schedules()
    image_tokens = max(plan.image_tokens for plan in schedules)
    min_len = image_tokens + 8
    if options.max_seq_len < min_len:
        raise SettingError(f"{{max_seq_len}} {options.max_seq_len} cannot hold the {image_tokens} image tokens and a prompt: use at least {min_len}")
    ops = PLUGIN_OPS if options.plugins else REFERENCE_OPS
    pipelines = [VisionDropPipeline(model, plan, ops, family).eval() for plan in schedules]
    graphs = graph_specs(pipelines, spec)
    metadata = {"visiondrop.schedule": schedule.describe(), "visiondrop.model": loaded.source}
    manifest = Manifest(
        model={"source": loaded.source, "content_hash": loaded.content_hash,
               "architecture": family.architecture, "family": family.name, "text_model_type": text.model_type},
        spec=spec.to_dict(),
        export={"mode": "plugins" if options.plugins else "portable", **asdict(options), "embed_tokens": EMBED_FILE,
                "plugins": {"library": PLUGIN_LIBRARY, "domain": PLUGIN_DOMAIN, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
                            "ops": [SELECT_OP, MERGE_OP]} if options.plugins else None,
                "kv_cache_layout": "[batch_size, num_kv_heads, sequence, head_dim] per layer; "
                                   "each decoder group's cache has its own length"},
        graphs=[], tolerances=gates_for({"dtype": options.dtype}).to_dict(),
    )

    def fill(directory: Path, scratch: Path) -> None:
        for number, graph in enumerate(graphs, 1):
            progress(f"[{number}/{len(graphs)}] exporting {graph.name} ...")
            manifest.graphs.append(export_graph(graph, directory, scratch, options, metadata))
        save_file({"weight": pipelines[0].embed_tokens.weight.detach().contiguous()}, directory / EMBED_FILE)
        loaded.processor.save_pretrained(directory)
        manifest.write(directory)

    # The traces go to the staging folder's scratch beside --out, not $TMP, so a crash leaves
    # nothing that the next export to --out does not clean up.
    write_atomically(out, fill, force=force, protect=[loaded.directory] if loaded.directory else [])
    return manifest

"""``calibrate``: a float artifact folder in, a folder of explicit-quantization (Q/DQ) graphs out.

Quantization is done by ONNX Runtime's quantizer, not written here. ``quantize_static``
(QDQ format) does INT8 and FP8, and ``MatMulNBitsQuantizer`` (QDQ format) does INT4 weight-only:

- int8: QInt8, symmetric activations and weights (zero points 0, which TensorRT requires).
  Weights are per output channel, activations per tensor, with MinMax ranges from the
  calibration run. Q/DQ sits on the linear layers' inputs only, one pair per consumer.
- fp8: E4M3FN at opset 19, with the same placement. Activation scales come from max
  calibration (amax / 448, TensorRT's and ModelOpt's FP8 recipe), given to ORT as overrides.
  ORT's own float8 scales fit a Gaussian and cost accuracy (see ``_quantize_activations``).
- int4-weight: W4A16. The decoder's linear weights become int4 with a scale per block of
  ``block_size`` along the input dimension (round to nearest, symmetric), at opset 21.
  Activations stay float. The LM head stays float, as TensorRT Edge-LLM and ModelOpt leave it.

Which nodes get Q/DQ is decided in ``calibration/select.py``. The prune graphs are copied
byte for byte. Activation ranges are collected with ORT's calibrators in a session that can
run plugin-mode graphs (``runtime.ort_backend``'s custom ops). ``quantize_static`` then reads
them from a calibration cache, so the calibrator never has to load a plugin graph itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from visiondrop_edge.gates import gates_for
from visiondrop_edge.manifest import MANIFEST, GraphEntry, Manifest, read_manifest, refuse_multi_crop
from visiondrop_edge.errors import SettingError, UserError
from visiondrop_edge.loading import check_target, sha256_file, write_atomically

from .data import GraphFeeds, calibration_set, record_feeds
from .select import FLOAT_CLASSES, lm_head, scoring_linears, vision_prune_nodes, weighted_linears

PRECISIONS = ("int8", "fp8", "int4-weight")
DEFAULT_SAMPLES = 8
CALIBRATION_BATCH = 4
CALIBRATION_NEW_TOKENS = 3  # decode steps per sample: decoders also see their decode-phase inputs
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # as export: protobuf's 2 GB limit

# How ONNX Runtime (1.31, CPU) must open each precision's graphs; the manifest records it as
# ``export.quantization.onnxruntime`` for every ORT consumer:
# - int8: ORT fuses DequantizeLinear -> MatMul into its int8 kernel (MatMulIntegerToFloat)
#   only where the DequantizeLinear has one consumer. The graphs carry one Q/DQ pair per
#   consumer (DedicatedQDQPair), but ORT's common-subexpression elimination merges them
#   again: with it, 7 of a decoder group's 11 int8 linears run as DequantizeLinear + fp32
#   MatMul (slower than fp32); without it, all 11 are fused.
# - fp8: ORT's QDQ transforms move float8 QuantizeLinear nodes across Transpose into an
#   invalid graph, and no CPU kernel computes in fp8. With them off, ORT runs the Q/DQ
#   reference semantics (DequantizeLinear -> float ops).
ORT_SETTINGS = {
    "int8": {"session_config": {}, "disabled_optimizers": ["CommonSubexpressionElimination"]},
    "fp8": {"session_config": {"session.disable_quant_qdq": "1"}, "disabled_optimizers": []},
    "int4-weight": {"session_config": {}, "disabled_optimizers": []},
}


@dataclass(frozen=True)
class Recipe:
    precision: str
    roles: tuple[str, ...]  # graph roles that get Q/DQ
    min_opset: int
    why_opset: str
    method: str


RECIPES = {r.precision: r for r in (
    Recipe("int8", ("vision", "qkv", "decoder"), 13, "per-channel QuantizeLinear/DequantizeLinear (axis) since opset 13",
           "onnxruntime.quantization.quantize_static, QDQ, QInt8 symmetric (ActivationSymmetric, WeightSymmetric), "
           "MinMax calibration; weights per output channel, activations per tensor"),
    Recipe("fp8", ("vision", "qkv", "decoder"), 19, "float8 QuantizeLinear/DequantizeLinear need opset 19",
           "onnxruntime.quantization.quantize_static, QDQ, QFLOAT8E4M3FN; activations per tensor with max "
           "calibration (scale = amax / 448, as TensorRT/ModelOpt FP8), weights per output channel (ORT's float8 scales)"),
    Recipe("int4-weight", ("qkv", "decoder"), 21, "block-wise (block_size) int4 DequantizeLinear needs opset 21",
           "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer, QDQ format, int4 symmetric "
           "round-to-nearest (RTN), one scale per block along the input dimension; activations float (W4A16)"),
)}

INT4_TENSORRT = ("TensorRT parses opset-21 block-wise int4 DequantizeLinear only where its ONNX parser reads opset 21 "
                 "(TensorRT 10.0/10.1 document opsets 9-20, TensorRT 11 up to 25): build it with a TensorRT that "
                 "parses opset 21, not the opset-17 toolchain of JetPack 6 / TensorRT 10.3")


@dataclass(frozen=True)
class CalibrateOptions:
    precision: str
    data: str = "builtin"
    samples: int | None = None
    opset: int | None = None  # None: the lowest opset the precision needs (never below the source's)
    block_size: int = 128  # int4-weight only

    def __post_init__(self):
        if self.precision not in RECIPES:
            raise SettingError(f"{{precision}} {self.precision} is not supported: use {', '.join(PRECISIONS)}")
        if self.samples is not None and self.samples < 1:
            raise SettingError(f"{{samples}} {self.samples}: give at least 1")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SettingError(f"{{block_size}} {self.block_size}: use a power of two of at least 16 (128 is usual)")


FP16_SCALES_OPSET = 19  # DequantizeLinear takes fp16 scales (the fp16 graphs' dtype) from opset 19


def target_opset(recipe: Recipe, source_opset: int, requested: int | None, dtype: str = "fp32") -> int:
    """The quantized graphs' opset, or a one-line refusal where the asked-for opset cannot carry the precision."""
    needed, why = recipe.min_opset, recipe.why_opset
    if dtype == "fp16" and FP16_SCALES_OPSET > needed:
        needed, why = FP16_SCALES_OPSET, "fp16 graphs need fp16 Q/DQ scales, which DequantizeLinear takes from opset 19"
    if requested is None:
        return max(source_opset, needed)
    if requested < needed:
        extra = f"; {INT4_TENSORRT}" if recipe.precision == "int4-weight" else ""
        fallback = "" if dtype == "fp16" else f", or {{precision}} int8 for opset {requested}"
        raise SettingError(f"{{precision}} {recipe.precision} cannot be carried by opset {requested}: {why} "
                           f"(use {{opset}} {needed}{fallback}){extra}")
    if requested < source_opset:
        raise SettingError(f"{{opset}} {requested} is below the source graphs' opset {source_opset}: opsets only go up")
    highest = max(r.min_opset for r in RECIPES.values())
    if requested > highest:
        raise SettingError(f"{{opset}} {requested}: no precision here needs more than opset {highest}, and older TensorRT "
                           "parsers read fewer opsets; leave {opset} out")
    return requested


def _session_options(precision: str | None, plugins: bool):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    for key, value in ORT_SETTINGS.get(precision or "", {}).get("session_config", {}).items():
        options.add_session_config_entry(key, value)
    if plugins:
        from visiondrop_edge.plugins_trt.ort_ops import custom_ops_library

        options.register_custom_ops_library(custom_ops_library())
    return options


def _session(path: Path, precision: str | None, plugins: bool):
    """A CPU session over one (quantized, possibly plugin-mode) graph, with its precision's ORT settings."""
    import onnxruntime

    model: str | bytes = str(path)
    if plugins:
        from visiondrop_edge.plugins_trt.ort_ops import ort_model

        model = ort_model(onnx.load(str(path))).SerializeToString()
    disabled = ORT_SETTINGS.get(precision or "", {}).get("disabled_optimizers") or None
    return onnxruntime.InferenceSession(model, _session_options(precision, plugins), providers=["CPUExecutionProvider"],
                                        disabled_optimizers=disabled)



class _Feeds(CalibrationDataReader):
    """ORT's reader protocol over recorded feeds: get_next, then None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def _activation_ranges(model_path: Path, feeds, method, scratch: Path, plugins: bool):
    """ORT's calibrator over ``feeds``, in a session that also runs plugin nodes; returns its TensorsData."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, DistributionCalibrater, MinMaxCalibrater

    augmented = scratch / "augmented.onnx"
    ops = ["MatMul", "Gemm", "Conv"]
    if method == CalibrationMethod.MinMax:
        calibrator = MinMaxCalibrater(model_path, ops, augmented, symmetric=True, max_intermediate_outputs=8)
    else:
        calibrator = DistributionCalibrater(model_path, ops, augmented, num_bins=2048)  # what quantize_static uses
    calibrator.augment_graph()
    calibrator.infer_session = _session(augmented, None, plugins)
    for feed in feeds:  # one call per feed: histograms merge across calls, not across shapes within one
        calibrator.collect_data(_Feeds([feed]))
    return calibrator.compute_data()


def _quantize_activations(source: Path, target: Path, recipe: Recipe, opset: int, feeds, nodes: list[str],
                          scratch: Path, plugins: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    model = onnx.load(str(source))
    if opset > _opset(model):
        model = onnx.version_converter.convert_version(model, opset)
    upgraded = scratch / "input.onnx"
    onnx.save_model(model, str(upgraded), save_as_external_data=True, location="input.onnx.data")
    fp8 = recipe.precision == "fp8"
    ranges = _activation_ranges(upgraded, feeds, CalibrationMethod.MinMax, scratch, plugins)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             # one Q/DQ pair per consumer, on linear inputs only (ModelOpt's placement; see ORT_SETTINGS)
             "DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]}
    method = CalibrationMethod.MinMax
    if fp8:
        # ORT allows only its Distribution calibration for float8 and sets scales from a Gaussian fit of
        # each tensor. Activations get max calibration instead (TensorRT's and ModelOpt's FP8 recipe):
        # scale = amax / 448 through ORT's own overrides. On the tiny model's decoder_0 the worst cosine
        # is 0.998 this way against 0.988 with the fit.
        from ml_dtypes import finfo, float8_e4m3fn

        largest = float(finfo(float8_e4m3fn).max)
        extra["TensorQuantOverrides"] = {
            name: [{"scale": np.array(np.abs(np.asarray(data.range_value, np.float64)).max() / largest, np.float32),
                    "zero_point": np.array(0, float8_e4m3fn)}]
            for name, data in ranges.data.items()
        }
        method = CalibrationMethod.Distribution
        ranges = _activation_ranges(upgraded, feeds, method, scratch, plugins)  # the bookkeeping ORT requires
    cache = scratch / "ranges.json"
    save_tensors_data(ranges, cache)
    kind = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    quantize_static(
        str(upgraded), str(target), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
        per_channel=True, activation_type=kind, weight_type=kind, nodes_to_quantize=nodes, calibrate_method=method,
        calibration_cache_path=cache, use_external_data_format=True, extra_options=extra,
    )


def _quantize(recipe: Recipe, options: CalibrateOptions, opset: int, source: Path, target: Path, model: onnx.ModelProto,
              nodes: list[str], feeds, scratch: Path, plugins: bool) -> None:
    if recipe.precision == "int4-weight":
        exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
        _quantize_weights_int4(source, target, opset, options.block_size, exclude)
    else:
        _quantize_activations(source, target, recipe, opset, feeds, nodes, scratch, plugins)


def _quantize_weights_int4(source: Path, target: Path, opset: int, block_size: int, exclude: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(source))
    if opset > _opset(model):
        model = onnx.version_converter.convert_version(model, opset)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                     nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(target), save_as_external_data=True, location=target.name + ".data")


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantizers log advice and print progress meant for notebooks; keep the CLI's output readable."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _save_final(quantized: Path, directory: Path, entry: GraphEntry, producer: str) -> GraphEntry:
    """Re-save a quantized graph into the folder (external data only past 2 GB, as export) and check it."""
    model = onnx.load(str(quantized))
    model.producer_name, model.producer_version = "visiondrop-edge", producer
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_BYTES
    data_name = f"{entry.name}.onnx.data" if external else None
    target = directory / entry.file
    onnx.save_model(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    if not any(n.domain not in ("", "ai.onnx", "com.microsoft") for n in model.graph.node):
        onnx.checker.check_model(str(target))  # plugin nodes have no ONNX schema to check against
    return GraphEntry(entry.name, entry.file, entry.role, entry.index, entry.inputs, entry.outputs, data_name)


def _cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    """Cosine over the reference's finite entries (the CLS score is +inf); -1 if the non-finite ones differ."""
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    finite = np.isfinite(b)
    if not (np.array_equal(a[~finite], b[~finite]) and np.isfinite(a[finite]).all()):
        return -1.0
    a, b = a[finite], b[finite]
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norms) if norms else float(np.array_equal(a, b))


def graph_cosines(float_graph: Path, quantized_graph: Path, feeds, precision: str, plugins: bool) -> dict[str, float]:
    """Worst cosine per float output of the quantized graph against the float one, over ``feeds``."""
    reference, ours = _session(float_graph, None, plugins), _session(quantized_graph, precision, plugins)
    names = [o.name for o in reference.get_outputs()]
    worst = {}
    for feed in feeds:
        for name, r, o in zip(names, reference.run(None, feed), ours.run(None, feed)):
            if np.issubdtype(r.dtype, np.floating):
                worst[name] = min(worst.get(name, 1.0), _cosine(o, r))
    return worst


def _plan(model: onnx.ModelProto, entry: GraphEntry, excluded: list[dict]) -> list[str]:
    """The linear nodes to quantize; records the ones kept float in ``excluded``."""
    float_nodes: set[str] = set()
    if entry.role == "vision":
        prune = vision_prune_nodes(model)
        float_nodes |= set(prune)
        if prune:
            excluded.append({"graph": entry.name, "nodes": prune, "scope": "stage-0 prune: CLS-attention scores, "
                             "select (top-k), merge", "reason": "pruning decisions stay float"})
    scoring = scoring_linears(model, entry.role, entry.index)
    if scoring:
        float_nodes |= set(scoring)
        reason = ("the stage-0 scores are computed from float values (quantizing the tower ahead of them moved them "
                  "to cosine 0.94 on the tiny model)" if entry.role == "vision" else
                  f"prune_{entry.index} scores with these q/k (the next group's), so they stay float; v reads the same input, and ORT's "
                  "QDQ would route q/k through its DequantizeLinear too")
        excluded.append({"graph": entry.name, "nodes": scoring, "scope": "linear layers the prune scores depend on",
                         "reason": reason})
    head = lm_head(model)
    if head is not None:
        float_nodes.add(head.name)
        excluded.append({"graph": entry.name, "nodes": [head.name], "scope": "LM head",
                         "reason": "logits are the most sensitive product; ModelOpt's and Edge-LLM's default recipes "
                                   "leave lm_head unquantized"})
    return [n.name for n in weighted_linears(model) if n.name not in float_nodes]


@dataclass
class GraphReport:
    name: str
    role: str
    quantized_nodes: int
    qdq_nodes: int
    bytes_before: int
    bytes_after: int
    worst_cosine: float | None  # on the calibration inputs (None: copied unchanged)


def calibrate_artifacts(source: str | Path, out: str | Path, options: CalibrateOptions, force: bool = False,
                        progress: Callable[[str], None] = lambda message: None) -> tuple[Manifest, list[GraphReport]]:
    """Write the quantized artifact folder ``out`` atomically; returns its manifest and a per-graph report."""
    import onnxruntime
    from transformers import AutoProcessor

    from visiondrop_edge.runtime.ort_backend import OrtBackend

    source, out = Path(source), Path(out)
    manifest = read_manifest(source)
    refuse_multi_crop(manifest, source, "calibrate", "run them in fp32/fp16")
    export = manifest.export
    if export.get("quantization"):
        raise UserError(f"{source} is already calibrated ({export['quantization']['precision']}): calibrate its float source")
    recipe = RECIPES[options.precision]
    if recipe.precision == "fp8" and export["dtype"] == "fp16":
        raise UserError("fp8 calibration of an fp16 export fails inside ONNX Runtime's Distribution calibrator "
                        "(fp16 histograms): calibrate the fp32 export (`python cli.py export --dtype fp32`)")
    opset = target_opset(recipe, int(export["opset"]), options.opset, export["dtype"])
    plugins = export.get("mode") == "plugins"
    data = calibration_set(options.data, options.samples, DEFAULT_SAMPLES)
    check_target(out, force, protect=[source])  # before the calibration run (checked again under the write lock)
    progress(f"calibration data: {data.samples} samples from {data.source} (sha256 {data.sha256[:12]}...)")
    backend = OrtBackend(source, provider="cpu", manifest=manifest, verify=False)
    processor = AutoProcessor.from_pretrained(source)
    feeds = record_feeds(backend, processor, data, CALIBRATION_BATCH, CALIBRATION_NEW_TOKENS, progress)
    del backend
    excluded = [{"graph": f"prune_{e.index}", "reason": "scores, top-k and merge stay float: pruning decisions are "
                 "not made on quantized values (copied unchanged)"} for e in manifest.graphs if e.role == "prune"]
    excluded += FLOAT_CLASSES
    if recipe.precision == "int4-weight":
        excluded.append({"graph": "vision_encoder", "reason": "W4A16 is for the decoder's weight-bound GEMMs; "
                         "the ViT stays in the export dtype (as TensorRT Edge-LLM keeps an FP16 ViT)"})
    reports: list[GraphReport] = []
    graphs: list[GraphEntry] = []

    def fill(directory: Path, scratch_root: Path) -> None:
        for name in manifest.files:
            if not any(name in (e.file, e.external_data) for e in manifest.graphs):
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, directory / name)
        for number, entry in enumerate(manifest.graphs, 1):
            before = _graph_bytes(source, entry)
            model = onnx.load(str(source / entry.file), load_external_data=False)
            nodes = _plan(model, entry, excluded) if entry.role in recipe.roles else []
            if not nodes:  # (an empty list would mean "all" to ORT)
                for name in (entry.file, entry.external_data):
                    if name:
                        shutil.copy2(source / name, directory / name)
                graphs.append(entry)
                reports.append(GraphReport(entry.name, entry.role, 0, 0, before, before, None))
                continue
            progress(f"[{number}/{len(manifest.graphs)}] quantizing {entry.name} ({recipe.precision}) ...")
            with tempfile.TemporaryDirectory(prefix=f"{entry.name}-", dir=scratch_root) as scratch:
                quantized = Path(scratch) / "quantized.onnx"
                with _quiet_quantizer():
                    _quantize(recipe, options, opset, source / entry.file, quantized, model, nodes, feeds[entry.name],
                              Path(scratch), plugins)
                final = _save_final(quantized, directory, entry, f"calibrate {recipe.precision}")
            graphs.append(final)
            cosines = graph_cosines(source / entry.file, directory / entry.file, feeds[entry.name], recipe.precision, plugins)
            qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(directory / entry.file)).graph.node)
            reports.append(GraphReport(entry.name, entry.role, len(nodes), qdq, before, _graph_bytes(directory, final),
                                       min(cosines.values()) if cosines else None))
        quantized_export = {
            **export,
            "quantization": {
                "precision": recipe.precision,
                "method": recipe.method,
                "library": f"onnxruntime {onnxruntime.__version__}",
                "opset": opset,
                "opset_why": recipe.why_opset + ("; fp16 scales need opset 19" if export["dtype"] == "fp16" else ""),
                "block_size": options.block_size if recipe.precision == "int4-weight" else None,
                "graphs": [e.name for e in manifest.graphs if e.role in recipe.roles],
                "data": data.to_dict(),
                "calibration_run": {"batch": CALIBRATION_BATCH, "decode_steps": CALIBRATION_NEW_TOKENS,
                                    "feeds_per_graph": {name: len(f) for name, f in feeds.items()}},
                "excluded": excluded,
                "onnxruntime": ORT_SETTINGS[recipe.precision],
                "tensorrt": _tensorrt_note(recipe),
                "source_artifacts": {"path": str(source.resolve()), "manifest_sha256": sha256_file(source / MANIFEST)},
                "worst_cosine_on_calibration_inputs": {r.name: r.worst_cosine for r in reports if r.worst_cosine is not None},
            },
        }
        quantized_manifest = Manifest(model=manifest.model, spec=manifest.spec, export=quantized_export, graphs=graphs,
                                      tolerances=gates_for(quantized_export).to_dict())
        quantized_manifest.write(directory)

    write_atomically(out, fill, force=force, protect=[source])  # never over the folder being read
    return read_manifest(out), reports


def _tensorrt_note(recipe: Recipe) -> str:
    if recipe.precision == "int4-weight":
        return INT4_TENSORRT
    if recipe.precision == "fp8":
        return "FP8 needs compute capability >= 8.9 (Ada, Hopper, Thor); Jetson Orin has no FP8: use int8 or int4-weight there"
    return ("INT8 Q/DQ with zero points 0 at the source's opset: the form TensorRT's ONNX parser documents "
            "(DequantizeLinear INT8, zero point 0); build strongly typed; INT8 runs on Orin, Hopper and Thor")


def _graph_bytes(directory: Path, entry: GraphEntry) -> int:
    return sum((directory / name).stat().st_size for name in (entry.file, entry.external_data) if name)


"""calibrate: Q/DQ folders on the tiny model, checked with ONNX Runtime independently of validate."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from visiondrop_edge import cli
from visiondrop_edge.calibration.data import builtin_set, record_feeds
from visiondrop_edge.calibration.quantize import CalibrateOptions, calibrate_artifacts
from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.plugins_trt import PLUGIN_DOMAIN
from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.ort_backend import OrtBackend
from visiondrop_edge.prompt import build_prompts, pixel_values, random_images
from visiondrop_edge.schedule import Schedule

PRECISIONS = ("int8", "fp8", "int4-weight")
QDQ = ("QuantizeLinear", "DequantizeLinear")
GATE = 0.99  # TensorRT Edge-LLM's cosine gate, the one validate applies to quantized folders


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    source = root / "tiny-64"
    export_artifacts(tiny, Schedule.from_budget(64, 8, 576), source, ExportOptions())
    out = {"fp32": source}
    for precision in PRECISIONS:
        out[precision] = root / f"tiny-64-{precision}"
        calibrate_artifacts(source, out[precision], CalibrateOptions(precision))
    return out


@pytest.fixture(scope="module")
def feeds(folders, tiny):
    """Every graph's inputs in a float pipeline run on two fresh samples (not the calibration set)."""
    backend = OrtBackend(folders["fp32"], provider="cpu")
    data = builtin_set(2)
    data = type(data)("test", random_images(2, seed=77), ["What is here?", "Describe the colours in detail."])
    return record_feeds(backend, tiny.processor, data, batch_size=2, new_tokens=2)


def _session(path, precision=None):
    options = onnxruntime.SessionOptions()
    if precision == "fp8":  # no fp8 CPU kernels: run DequantizeLinear -> float ops (see calibration/quantize.py)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _fused_int8_kernels(path, disabled):
    """ONNX Runtime's optimized graph: how many MatMuls run as its int8 kernel, how many stay float."""
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path.parent / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return ops.count("MatMulIntegerToFloat"), ops.count("DequantizeLinear")


def _cosine(a, b):
    """Cosine over the finite entries; non-finite ones (the CLS score is +inf) must match exactly."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    finite = np.isfinite(b)
    np.testing.assert_array_equal(a[~finite], b[~finite])
    a, b = a[finite], b[finite]
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    assert norms > 0
    return float(a @ b / norms)


def _worst_cosines(float_path, quant_path, feeds, precision):
    ref, ours = _session(float_path), _session(quant_path, precision)
    names = [o.name for o in ref.get_outputs()]
    worst = {}
    for feed in feeds:
        for name, r, o in zip(names, ref.run(None, feed), ours.run(None, feed)):
            if np.issubdtype(r.dtype, np.floating):
                worst[name] = min(worst.get(name, 1.0), _cosine(o, r))
    assert worst, "no float output compared"
    return worst


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_runs_end_to_end(folders, tiny, precision):
    backend = OrtBackend(folders[precision], provider="cpu")  # applies the folder's recorded ORT settings
    spec = backend.spec
    prompts = build_prompts(tiny.tokenizer, spec.prompt_template, ["What is in this image?"] * 2, spec.schedule.image_tokens,
                            spec.image_token_id, spec.pad_token_id)
    result = greedy_generate(backend, pixel_values(tiny.processor.image_processor, random_images(2, seed=5)), prompts, 4)
    assert result.tokens.shape == (2, 4)
    assert all(bool(np.isfinite(step.numpy()).all()) for step in result.step_logits)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_qdq_symmetric_per_channel_and_never_in_prunes(folders, precision):
    source, folder = folders["fp32"], folders[precision]
    manifest = read_manifest(folder)
    quantized = 0
    for entry in manifest.graphs:
        model = onnx.load(str(folder / entry.file))
        values = _initializers(model)
        qdq = [n for n in model.graph.node if n.op_type in QDQ]
        if entry.role == "prune":
            assert not qdq
            assert (folder / entry.file).read_bytes() == (source / entry.file).read_bytes()
            continue
        quantized += bool(qdq)
        for node in qdq:
            if len(node.input) > 2:  # a zero point given explicitly must be 0: TensorRT rejects any other
                assert not np.asarray(values[node.input[2]], dtype=np.float32).any(), node.name
            scale = values[node.input[1]]
            weight = node.input[0] in values
            if precision == "int4-weight":
                attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert node.op_type == "DequantizeLinear" and attributes["block_size"] == 128
                assert values[node.input[0]].dtype.name == "int4"
            elif weight:  # per output channel: one scale per column of the [in, out] MatMul weight
                assert scale.shape == (values[node.input[0]].shape[1],), node.name
            else:  # activations per tensor
                assert scale.shape == (), node.name
        opsets = {o.domain: o.version for o in model.opset_import}
        if qdq:
            assert opsets[""] == {"int8": 17, "fp8": 19, "int4-weight": 21}[precision]
        producers = {o: n for n in model.graph.node for o in n.output}
        for name in ("next_query", "next_key", "next_value"):  # the next group's q/k/v: what the prune scores with
            if not any(o.name == name for o in model.graph.output):
                continue
            node = producers[name]
            while node.op_type != "MatMul":  # back through the head reshapes to the projection
                node = producers[node.input[0]]
            assert all(producers[i].op_type not in QDQ for i in node.input if i in producers), (entry.name, name, node.name)
    assert quantized == (5 if precision == "int4-weight" else 6)  # every weighted graph: qkv_0, 4 decoders (+ vision)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_stage0_prune_computes_on_float_values(folders, feeds, precision):
    """No Q/DQ node is upstream of the stage outputs, so the quantized vision graph decides exactly as the float one."""
    model = onnx.load(str(folders[precision] / "vision_encoder.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    frontier, seen = ["scores", "kept_index", "target_index"], set()
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        assert node.op_type not in QDQ, f"{node.name} feeds the stage-0 decisions"
        frontier += [] if node.op_type == "Shape" else list(node.input)
    assert any(n.op_type in QDQ for n in model.graph.node)  # the projector is quantized
    ref, ours = _session(folders["fp32"] / "vision_encoder.onnx"), _session(folders[precision] / "vision_encoder.onnx", precision)
    names = [o.name for o in ref.get_outputs()]
    for feed in feeds["vision_encoder"]:
        got = dict(zip(names, ours.run(None, feed)))
        for name, r in zip(names, ref.run(None, feed)):
            if not np.issubdtype(r.dtype, np.floating):
                np.testing.assert_array_equal(got[name], r)
        np.testing.assert_array_equal(got["scores"], dict(zip(names, ref.run(None, feed)))["scores"])


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_every_quantized_graph_meets_the_cosine_gate(folders, feeds, precision):
    manifest = read_manifest(folders[precision])
    for name in manifest.export["quantization"]["graphs"]:
        worst = _worst_cosines(folders["fp32"] / f"{name}.onnx", folders[precision] / f"{name}.onnx", feeds[name], precision)
        assert min(worst.values()) >= GATE, (name, worst)


def test_scales_times_ten_fail_the_cosine_gate(folders, feeds, tmp_path):
    """Mutated calibration: every activation scale x10 (the weights untouched) must fall below the gate."""
    model = onnx.load(str(folders["int8"] / "decoder_0.onnx"))
    weights = {i.name for i in model.graph.initializer if i.name.endswith("_quantized")}
    activation_scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}
    assert activation_scales
    for tensor in model.graph.initializer:
        if tensor.name in activation_scales:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(10), tensor.name))
    mutated = tmp_path / "decoder_0.onnx"
    onnx.save(model, str(mutated))
    float_graph = folders["fp32"] / "decoder_0.onnx"
    assert min(_worst_cosines(float_graph, folders["int8"] / "decoder_0.onnx", feeds["decoder_0"], "int8").values()) >= GATE
    assert min(_worst_cosines(float_graph, mutated, feeds["decoder_0"], "int8").values()) < GATE


def test_int8_linears_run_as_int8_kernels_on_onnxruntime(folders, tmp_path):
    """With the recorded settings every quantized linear of a decoder group becomes ORT's int8 MatMul."""
    settings = read_manifest(folders["int8"]).export["quantization"]["onnxruntime"]
    graph = tmp_path / "decoder_1.onnx"
    graph.write_bytes((folders["int8"] / "decoder_1.onnx").read_bytes())
    assert _fused_int8_kernels(graph, settings["disabled_optimizers"]) == (11, 0)  # 4 + 7 linears of its two layers
    assert _fused_int8_kernels(graph, None)[0] < 11  # ORT's defaults merge the per-consumer Q/DQ pairs


def test_manifest_records_method_data_and_exclusions(folders):
    manifest = read_manifest(folders["int8"])
    q = manifest.export["quantization"]
    assert q["precision"] == "int8" and "quantize_static" in q["method"] and "Symmetric" in q["method"]
    assert q["library"] == f"onnxruntime {onnxruntime.__version__}"
    assert q["data"]["source"] == "builtin" and q["data"]["samples"] == 8 and len(q["data"]["sha256"]) == 64
    source_manifest = (folders["fp32"] / "manifest.json").read_bytes()
    assert q["source_artifacts"]["manifest_sha256"] == hashlib.sha256(source_manifest).hexdigest()
    graphs_excluded = {e.get("graph") for e in q["excluded"] if "nodes" not in e}
    assert {"prune_0", "prune_1", "prune_2"} <= graphs_excluded
    scopes = {(e["graph"], e["scope"]): e["nodes"] for e in q["excluded"] if "scope" in e}
    prune = scopes[("vision_encoder", "stage-0 prune: CLS-attention scores, select (top-k), merge")]
    vision_ops = {n.name: n.op_type for n in onnx.load(str(folders["fp32"] / "vision_encoder.onnx")).graph.node}
    assert {"TopK", "ArgMax", "Softmax"} & {vision_ops[name] for name in prune}
    assert scopes[("decoder_3", "LM head")] == ["/lm_head/MatMul"]
    assert all(e["reason"] for e in q["excluded"])
    assert manifest.tolerances["precision"] == "int8" and manifest.tolerances["cosine"] == GATE


def test_data_folder_and_plugin_mode(tiny, tmp_path):
    """--data DIR through the CLI, on plugin-mode artifacts: plugin nodes carried through, graphs meet the gate."""
    source = tmp_path / "tiny-64-plugins"
    export_artifacts(tiny, Schedule.from_budget(64, 8, 576), source, ExportOptions(plugins=True))
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for number, image in enumerate(random_images(3, seed=11)):
        image.save(data / f"image{number}.png")
        rows.append(json.dumps({"image": f"image{number}.png", "prompt": f"Question number {number}?"}))
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "int8"
    result = CliRunner().invoke(cli.cli, ["calibrate", "--artifacts", str(source), "--precision", "int8",
                                          "--data", str(data), "--samples", "2", "--out", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    q = read_manifest(out).export["quantization"]
    assert q["data"]["samples"] == 2 and q["data"]["source"] == str(data.resolve())
    assert q["data"]["sha256"] != builtin_set(2).sha256
    for name in ("vision_encoder", "prune_0"):
        count = [sum(n.domain == PLUGIN_DOMAIN for n in onnx.load(str(f / f"{name}.onnx")).graph.node) for f in (source, out)]
        assert count[0] == count[1] == 2
    assert sum(n.op_type in QDQ for n in onnx.load(str(out / "vision_encoder.onnx")).graph.node) > 0


@pytest.mark.parametrize("args, message", [
    (["--precision", "int4-weight", "--opset", "17"], "opset 21"),
    (["--precision", "int8", "--opset", "22"], "leave --opset out"),
    (["--precision", "fp8", "--opset", "17"], "opset 19"),
    (["--precision", "int8", "--data", "/nonexistent"], "not a folder"),
])
def test_refusals_are_one_line(folders, args, message):
    result = CliRunner().invoke(cli.cli, ["calibrate", "--artifacts", str(folders["fp32"]), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines() if hasattr(result, "stderr") else result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]


def test_a_calibrated_folder_is_not_calibrated_again(folders):
    result = CliRunner().invoke(cli.cli, ["calibrate", "--artifacts", str(folders["int8"]), "--precision", "int8"])
    assert result.exit_code == 2 and "already calibrated" in result.output


def test_bench_compares_a_quantized_folder_with_its_source(folders, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--artifacts-compare", f"{folders['fp32']},{folders['int8']}", "--batch", "1",
                                          "--repeats", "1", "--warmup", "0", "--max-new-tokens", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    [summary] = report["summary"]
    on_disk = [sum(p.stat().st_size for p in f.glob("*.onnx*")) for f in (folders["fp32"], folders["int8"])]
    assert summary["disk_ratio"] == pytest.approx(on_disk[1] / on_disk[0])  # every graph file, no external data here
    timings = {r["variant"]: r["prefill_ms"]["median"] for r in report["results"]}
    assert summary["prefill_speedup"] == pytest.approx(timings["baseline"] / timings["candidate"])
    assert {r["precision"] for r in report["results"]} == {"fp32", "int8"}


def test_fp16_export_gets_fp16_scales_at_opset_19(tiny, tmp_path):
    """fp16 graphs keep fp16 activations around int8 linears (TensorRT's strongly typed fp16 + int8)."""
    from visiondrop_edge.loading import EXPORT_DTYPES, apply_precision
    from visiondrop_edge.loading import load_model

    half = apply_precision(load_model("tiny", dtype=EXPORT_DTYPES["fp16"]), None)
    source = tmp_path / "tiny-64-fp16"
    export_artifacts(half, Schedule.from_budget(64, 8, 576), source, ExportOptions(dtype="fp16"))
    out = tmp_path / "int8"
    calibrate_artifacts(source, out, CalibrateOptions("int8", samples=4))
    assert read_manifest(out).export["quantization"]["opset"] == 19
    model = onnx.load(str(out / "decoder_0.onnx"))
    values = _initializers(model)
    scales = {values[n.input[1]].dtype.name for n in model.graph.node if n.op_type in QDQ}
    assert scales == {"float16"}
    backend = OrtBackend(source, provider="cpu")
    data = type(builtin_set(1))("test", random_images(2, seed=78), ["What is here?", "Name the colours."])
    feeds = record_feeds(backend, half.processor, data, batch_size=2, new_tokens=1)["decoder_0"]
    assert min(_worst_cosines(source / "decoder_0.onnx", out / "decoder_0.onnx", feeds, "int8").values()) >= GATE

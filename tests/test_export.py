"""ONNX export on the tiny model: parity with PyTorch, static shapes, determinism, integrity."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from visiondrop_edge import cli
from visiondrop_edge.export import onnx_export
from visiondrop_edge.export.graph_checks import data_dependent_shapes, undocumented_types
from visiondrop_edge.export.shapes import ShapeDerivationError, derived_graph, infer_shapes
from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.runtime.validate import validate_artifacts
from visiondrop_edge.errors import UserError
from visiondrop_edge.schedule import Schedule

BUDGETS = [32, 64, 128, 192, "full"]
CONTRACT_AXES = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length", "pruned_sequence_length"}


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    folders = {}
    for budget in BUDGETS:
        schedule = Schedule.from_budget(budget, 8, 576)
        folders[budget] = root / f"tiny-{budget}"
        export_artifacts(tiny, schedule, folders[budget], ExportOptions())
    return folders


@pytest.mark.parametrize("budget", BUDGETS)
def test_validate_passes_with_identical_greedy_tokens(exported, budget):
    report = validate_artifacts(exported[budget], batch_sizes=(1, 2), new_tokens=16, seed=40)
    failed = [c.name for c in report.checks.values() if not c.passed]
    assert report.passed, failed
    assert all(c.gated for c in report.checks.values())  # fp32: everything gates, end to end included
    tokens = report.checks["generate: 16-token greedy ids"]
    assert tokens.passed and tokens.detail == "random (seed 41): identical; random (seed 42): identical"
    assert report.decisions == []  # fp32 on the tiny model: boundary gaps >= 1e-4, errors ~1e-6, so no tie at all
    schedule = Schedule.from_budget(budget, 8, 576)
    kept_rows = [name for name in report.checks if name.endswith("kept_index")]
    assert len(kept_rows) == len(schedule.stages)
    tensor_rows = [c for c in report.checks.values() if c.kind == "tensor"]
    assert all(c.max_rel_err <= 1e-4 for c in tensor_rows)


def graph_files(folder):
    return sorted(folder.glob("*.onnx"))


@pytest.mark.parametrize("budget", BUDGETS)
def test_graphs_are_static_opset17_ir10(exported, budget):
    schedule = Schedule.from_budget(budget, 8, 576)
    manifest = read_manifest(exported[budget])
    for path in graph_files(exported[budget]):
        model = onnx.load(str(path))
        assert model.ir_version == 10 and [o.version for o in model.opset_import if o.domain == ""] == [17]
        ops = {n.op_type for n in model.graph.node}
        assert "NonZero" not in ops and not ops & {"Loop", "If", "Scan"}
        assert data_dependent_shapes(model) == []
        assert undocumented_types(model) == []  # e.g. CumSum/Clip only on float types
        for value in list(model.graph.input) + list(model.graph.output):
            for dim in value.type.tensor_type.shape.dim:
                assert dim.dim_param in CONTRACT_AXES or (not dim.dim_param and dim.dim_value > 0), (path.name, value.name)
    vision = manifest.graph("vision")
    outputs = {o["name"]: o["shape"] for o in vision.outputs}
    assert outputs["image_embeds"][1] == schedule.image_tokens
    if not schedule.is_full:
        assert outputs["kept_index"] == ["batch_size", schedule.vision.dominant]
        assert outputs["target_index"] == ["batch_size", schedule.vision.contextual]
    for index, stage in enumerate(schedule.llm_stages):
        shapes = {o["name"]: o["shape"] for o in manifest.graph("prune", index).outputs}
        assert shapes["kept_index"] == ["batch_size", stage.dominant]
        assert shapes["target_index"] == ["batch_size", stage.contextual]


def test_kv_cache_io_follows_optimum_names(exported):
    """The cache goes in under Optimum's names; only the new tokens' keys/values come out."""
    manifest = read_manifest(exported[64])
    for group, (start, stop) in enumerate(Schedule.from_budget(64, 8, 576).layer_groups()):
        entry = manifest.graph("decoder", group)
        inputs = {i["name"]: i["shape"] for i in entry.inputs}
        outputs = {o["name"]: o["shape"] for o in entry.outputs}
        for layer in range(start, stop):
            assert inputs[f"past_key_values.{layer}.key"] == ["batch_size", 2, "past_sequence_length", 16]
            assert outputs[f"new_key_values.{layer}.value"] == ["batch_size", 2, "sequence_length", 16]
        assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]


def test_type_lint_catches_integer_cumsum_and_clip():
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [4])
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    model = helper.make_model(helper.make_graph([helper.make_node("CumSum", ["x", "axis"], ["y"])], "g", [x], [y], [axis]))
    assert "CumSum" in undocumented_types(model)[0]
    floats = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT), helper.make_node("CumSum", ["f", "axis"], ["c"]),
         helper.make_node("Cast", ["c"], ["y"], to=TensorProto.INT64)], "g", [x], [y], [axis]))
    assert undocumented_types(floats) == []


def test_static_shape_lint_catches_data_dependent_shapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nonzero = helper.make_model(helper.make_graph([helper.make_node("NonZero", ["x"], ["y"])], "g", [x], [y]))
    assert "NonZero" in data_dependent_shapes(nonzero)[0]
    data_reshape = helper.make_model(helper.make_graph(
        [helper.make_node("Abs", ["shape"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])], "g", [x, shape], [y]))
    assert "depends on tensor values" in data_dependent_shapes(data_reshape)[0]
    shape_reshape = helper.make_model(helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])], "g", [x], [y]))
    assert data_dependent_shapes(shape_reshape) == []


def test_export_checks_derived_shapes_against_the_trace_and_the_contract(exported):
    """The exporter derives output shapes and compares; it does not write them. A traced size or a
    dynamic axis that the graph does not compute is refused, naming the output and the axis."""
    stage = Schedule.from_budget(64, 8, 576).llm_stages[0]
    model = onnx.load(str(exported[64] / "prune_0.onnx"))
    declared = {o["name"]: ([2 if d == "batch_size" else 9 if isinstance(d, str) else d for d in o["shape"]],
                            {i: d for i, d in enumerate(o["shape"]) if isinstance(d, str)})
                for o in read_manifest(exported[64]).graph("prune", 0).outputs}
    assert declared["kept_index"] == ([2, stage.dominant], {0: "batch_size"})
    derived = derived_graph(onnx.load(str(exported[64] / "prune_0.onnx")), declared)
    assert [o.SerializeToString() for o in derived.graph.output] == [o.SerializeToString() for o in model.graph.output]
    wrong_size = dict(declared, kept_index=([2, stage.dominant + 1], {0: "batch_size"}))
    with pytest.raises(ShapeDerivationError, match=f"kept_index axis 1: derived {stage.dominant}, traced {stage.dominant + 1}"):
        derived_graph(onnx.load(str(exported[64] / "prune_0.onnx")), wrong_size)
    wrong_axis = dict(declared, kept_index=([2, stage.dominant], {0: "batch_size", 1: "pruned_sequence_length"}))
    with pytest.raises(ShapeDerivationError, match="kept_index axis 1: derived .*contract says dynamic"):
        derived_graph(onnx.load(str(exported[64] / "prune_0.onnx")), wrong_axis)


def test_derivation_refuses_a_size_that_depends_on_values():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    nonzero = helper.make_model(helper.make_graph([helper.make_node("NonZero", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ShapeDerivationError, match="y axis 1: derived .*, traced 3"):
        derived_graph(nonzero, {"y": ([1, 3], {})})


@pytest.mark.parametrize("budget", [64, "full"])
def test_graphs_are_folded(exported, budget):
    """No Constant node is left, and every Shape node that remains reads a tensor with a dynamic
    axis (ONNX Runtime's symbolic inference on the exported graph says which)."""
    for path in graph_files(exported[budget]):
        model = infer_shapes(onnx.load(str(path)))
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
        assert not [n.name for n in model.graph.node if n.op_type == "Constant"], path.name
        static = [n.name for n in model.graph.node if n.op_type == "Shape" and all(isinstance(d, int) for d in dims[n.input[0]])]
        assert static == [], path.name


def test_export_hides_only_the_warnings_it_understands(tiny, tmp_path, capfd):
    """A plugin-mode export under warnings-as-errors raises nothing and prints no library warning;
    a TracerWarning from elsewhere still shows inside the exporter's filter."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_artifacts(tiny, Schedule.from_budget(64, 8, 576), tmp_path / "out", ExportOptions(plugins=True))
    printed = capfd.readouterr()
    assert "Warning" not in printed.err and "[W:onnxruntime" not in printed.err, printed.err[:2000]
    with pytest.warns(torch.jit.TracerWarning, match="not one we understand"):
        with onnx_export.understood_warnings():
            warnings.warn("not one we understand", torch.jit.TracerWarning)


def test_reexport_is_byte_identical(tiny, exported, tmp_path):
    again = tmp_path / "again"
    export_artifacts(tiny, Schedule.from_budget(64, 8, 576), again, ExportOptions())
    first = sorted(p.name for p in exported[64].iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    for name in first:
        assert (exported[64] / name).read_bytes() == (again / name).read_bytes(), name


def test_tampered_folder_is_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported[32], copy)
    path = copy / "decoder_1.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest"):
        read_manifest(copy)
    result = CliRunner().invoke(cli.cli, ["validate", "--artifacts", str(copy)])
    assert result.exit_code == 2 and "decoder_1.onnx does not match the manifest" in result.stderr
    result = CliRunner().invoke(cli.cli, ["validate", "--artifacts", str(tmp_path)])
    assert result.exit_code == 2 and "not an artifact folder" in result.stderr


def test_export_never_leaves_a_half_written_folder(tiny, tmp_path, monkeypatch):
    calls = []

    def failing(graph, *args, **kwargs):
        calls.append(graph.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted mid-export
        return real(graph, *args, **kwargs)

    real = onnx_export.export_graph
    monkeypatch.setattr(onnx_export, "export_graph", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_artifacts(tiny, Schedule.from_budget(32, 8, 576), out, ExportOptions())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    result = CliRunner().invoke(cli.cli, ["export", "--budget", "32", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_export_cli_writes_manifest_and_generate_runs_the_artifacts(tmp_path, tiny):
    out = tmp_path / "tiny-64"
    result = CliRunner().invoke(cli.cli, ["export", "--budget", "64", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "[9/9] exporting decoder_3" in result.stderr and "decoder_3" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schedule"]["spec"] == Schedule.from_budget(64, 8, 576).describe()
    assert manifest["model"]["content_hash"] == tiny.content_hash
    assert manifest["export"]["opset"] == 17 and manifest["export"]["ir_version"] == 10
    assert set(manifest["files"]) >= {"vision_encoder.onnx", "embed_tokens.safetensors", "tokenizer.json"}
    assert manifest["tolerances"]["relative"] == 1e-4 and manifest["tools"]["onnx"] == onnx.__version__
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(9).random((300, 200, 3)) * 255).astype("uint8")).save(image)
    args = ["--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "8", "--json", "-"]
    onnx_run = CliRunner().invoke(cli.cli, ["generate", "--artifacts", str(out), *args])
    torch_run = CliRunner().invoke(cli.cli, ["generate", "--model", "tiny", "--budget", "64", *args])
    assert onnx_run.exit_code == 0, onnx_run.output
    assert json.loads(onnx_run.stdout)["backend"] == "ort"
    assert json.loads(onnx_run.stdout)["generated_ids"] == json.loads(torch_run.stdout)["generated_ids"]
    mixed = CliRunner().invoke(cli.cli, ["generate", "--artifacts", str(out), "--budget", "32", *args])
    assert mixed.exit_code == 2 and "fixes the model and schedule" in mixed.stderr


def test_external_data_layout(tiny, tmp_path):
    out = tmp_path / "external"
    export_artifacts(tiny, Schedule.from_budget(32, 8, 576), out, ExportOptions(external_data="always"))
    manifest = read_manifest(out)
    for entry in manifest.graphs:
        if entry.role != "prune":  # weightless graphs have nothing to externalise
            assert (out / entry.external_data).stat().st_size > 0
            onnx.checker.check_model(str(out / entry.file), full_check=True)
    assert validate_artifacts(out, batch_sizes=(1,), new_tokens=4).passed

"""`build` planning as plain data (no TensorRT): profiles, kernel limits, the engine manifest's
refusals, the dry run on the tiny model's artifacts, and the one-line refusals without TensorRT.

Expected lengths are derived by hand from the schedule, not from the code: budget 128 on the
tiny 8-layer model is 168+24 | 2:120+20 | 4:88+16 | 6:64+12, so the decoder groups see
192, 140, 104 and 76 visual tokens (52, 88 and 116 fewer than the 192 spliced into the prompt).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from visiondrop_edge import cli
from visiondrop_edge.manifest import GraphEntry, read_manifest
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.export.trt_build import (
    BuildOptions,
    BuildPlan,
    engine_manifest,
    kernel_limit_problems,
    output_max_shapes,
    plan_build,
    profiles_for,
    sequence_ranges,
)
from visiondrop_edge.engines import Environment, check_engine_manifest
from visiondrop_edge.plugins_trt import MERGE_OP, PLUGIN_DOMAIN, SELECT_OP
from visiondrop_edge.errors import UserError
from visiondrop_edge.schedule import Schedule

SCHEDULE = Schedule.from_budget(128, 8, 576)
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ENV = Environment(tensorrt="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


def tensor(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def decoder_entry(group: int) -> GraphEntry:
    layer = 2 * group
    past = [tensor(f"past_key_values.{layer}.{kv}", "float32", ["batch_size", 2, "past_sequence_length", 16])
            for kv in ("key", "value")]
    return GraphEntry(
        name=f"decoder_{group}", file=f"decoder_{group}.onnx", role="decoder", index=group,
        inputs=[tensor("hidden_states", "float32", ["batch_size", "sequence_length", 64]),
                tensor("query", "float32", ["batch_size", 4, "sequence_length", 16]),
                tensor("attention_mask", "int64", ["batch_size", "total_sequence_length"]),
                tensor("position_ids", "int64", ["batch_size", "sequence_length"]), *past],
        outputs=[tensor("hidden_states_out", "float32", ["batch_size", "sequence_length", 64]),
                 tensor(f"new_key_values.{layer}.key", "float32", ["batch_size", 2, "sequence_length", 16])],
    )


def test_sequence_ranges_follow_the_visual_tokens_each_group_keeps():
    # Shortest prompt: the image plus one token; longest: max_seq_len minus one generated token.
    assert sequence_ranges(SCHEDULE, 2048, 224) == [(193, 224, 2047), (141, 172, 1995), (105, 136, 1959), (77, 108, 1931)]


def test_decoder_gets_a_prefill_and_a_decode_profile():
    prefill, decode = profiles_for(decoder_entry(1), [SCHEDULE], max_batch=4, max_seq_len=2048, opt_seq_len=224)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    # Prefill: the pruned prompt with an empty cache (past 0, total = sequence).
    assert prefill.axes == {"batch_size": [1, 1, 4], "sequence_length": [141, 172, 1995],
                            "total_sequence_length": [141, 172, 1995], "past_sequence_length": [0, 0, 0]}
    # Decode: one token (or a continuation up to the longest prompt: a question on a reused
    # prefix, a chat turn) on a cache buffer that holds at least the shortest prompt and at
    # most the longest; the mask covers the buffer and the continuation (1995 + 1995).
    assert decode.axes == {"batch_size": [1, 1, 4], "sequence_length": [1, 1, 1995],
                           "total_sequence_length": [142, 173, 3990], "past_sequence_length": [141, 172, 1995]}
    assert decode.shapes["past_key_values.2.key"] == [[1, 2, 141, 16], [1, 2, 172, 16], [4, 2, 1995, 16]]
    assert prefill.shapes["attention_mask"] == [[1, 141], [1, 172], [4, 1995]]
    assert output_max_shapes(decoder_entry(1), decode, SCHEDULE)["new_key_values.2.key"] == [4, 2, 1995, 16]


def test_the_next_groups_projections_and_its_prune_see_the_sequence_before_the_prune():
    # decoder_0 projects group 1's q/k/v on its own (unpruned) sequence, and prune_0 scores
    # them there: both take group 0's lengths (qkv_0 as well: it projects group 0's).
    hidden = [tensor("hidden_states", "float32", ["batch_size", "sequence_length", 64])]
    qkv = GraphEntry("qkv_0", "qkv_0.onnx", "qkv", 0, hidden, [tensor("query", "float32", ["batch_size", 4, "sequence_length", 16])])
    for entry in (qkv, decoder_entry(0)):
        prefill, decode = profiles_for(entry, [SCHEDULE], 1, 2048, 224)
        assert prefill.axes["sequence_length"] == [193, 224, 2047] and decode.axes["sequence_length"] == [1, 1, 2047]
    prune = GraphEntry("prune_0", "prune_0.onnx", "prune", 0,
                       hidden + [tensor("image_offset", "int64", ["batch_size"])],
                       [tensor("pruned_hidden_states", "float32", ["batch_size", "pruned_sequence_length", 64])])
    (only,) = profiles_for(prune, [SCHEDULE], 2, 2048, 224)
    assert only.shapes["hidden_states"] == [[1, 193, 64], [1, 224, 64], [2, 2047, 64]]
    assert output_max_shapes(prune, only, SCHEDULE)["pruned_hidden_states"] == [2, 2047 - 52, 64]


def test_opt_is_clamped_into_each_groups_range():
    assert sequence_ranges(SCHEDULE, 300, 299)[0] == (193, 299, 299)
    (profile, _) = profiles_for(decoder_entry(3), [SCHEDULE], 1, 300, 193)
    assert profile.axes["sequence_length"] == [77, 77, 183]


def _plugin_graph(n: int, k: int, m: int) -> onnx.ModelProto:
    """select -> merge plugin nodes fed by standard ops, as export writes them (the plugin
    outputs' traced types are symbolic: sizes must come from what feeds the select)."""
    relu = helper.make_node("Relu", ["raw_scores"], ["scores"])
    select = helper.make_node(SELECT_OP, ["scores", "tokens", "metric"], ["dom", "rest", "rest_metric", "kept", "rest_i"],
                              domain=PLUGIN_DOMAIN, k=k)
    merge = helper.make_node(MERGE_OP, ["rest", "rest_metric"], ["contextual", "assignment"], domain=PLUGIN_DOMAIN, c=4)
    symbolic = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", f"{name}_1", f"{name}_2"])
                for name in ("dom", "rest", "rest_metric")]
    inputs = [helper.make_tensor_value_info("raw_scores", TensorProto.FLOAT, ["B", n]),
              helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", n, 8]),
              helper.make_tensor_value_info("metric", TensorProto.FLOAT, ["B", n, m])]
    graph = helper.make_graph([relu, select, merge], "g", inputs,
                              [helper.make_tensor_value_info("contextual", TensorProto.FLOAT, ["B", 4, 8])],
                              value_info=symbolic)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(PLUGIN_DOMAIN, 1)])


def test_kernel_limits_are_refused_from_the_graph():
    assert kernel_limit_problems(_plugin_graph(4096, 100, 256), "ok") == []
    problems = kernel_limit_problems(_plugin_graph(5000, 100, 300), "big")
    assert any("N=5000" in p for p in problems)  # select over more than 4096 tokens
    assert any("R=4900" in p for p in problems)  # merge over more than 4096 remaining tokens
    assert any("M=300" in p for p in problems)  # metric wider than 256
    edge = kernel_limit_problems(_plugin_graph(4097, 1, 8), "edge")  # N one past the limit, R = 4096 exactly
    assert len(edge) == 1 and "N=4097" in edge[0]


def test_kernel_limits_read_the_sizes_of_a_real_plugin_export(tiny, tmp_path):
    """On export's own plugin graphs the sizes are found (and fit): the check is not vacuous there."""
    from visiondrop_edge.export.trt_build import kernel_limit_problems as problems_of

    folder = tmp_path / "plugins"
    export_artifacts(tiny, SCHEDULE, folder, ExportOptions(plugins=True, max_seq_len=512))
    model = onnx.load(str(folder / "prune_0.onnx"))
    assert problems_of(model, "prune_0") == []
    select = next(n for n in model.graph.node if n.op_type == SELECT_OP)
    for output in model.graph.output:  # a wider merge metric than the kernel takes
        if output.name == select.input[2]:
            output.type.tensor_type.shape.dim[2].dim_value = 300
    assert problems_of(model, "prune_0") == ["prune_0: VisionDropMerge metric width M=300 (the kernel takes M <= 256)"]
# ------------------------------------------------------------------ on the tiny model's artifacts

@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt-build") / "tiny-128"
    export_artifacts(tiny, SCHEDULE, folder, ExportOptions(max_seq_len=512))
    return folder


def test_dry_run_prints_the_plan_without_tensorrt(artifacts):
    runner = CliRunner()
    result = runner.invoke(cli.cli, ["build", "--artifacts", str(artifacts), "--max-batch", "2", "--dry-run", "--json", "-"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    manifest = read_manifest(artifacts)
    assert [e["graph"] for e in plan["engines"]] == [g.name for g in manifest.graphs]  # one engine per graph
    assert plan["max_seq_len"] == 512 and plan["opt_seq_len"] == 224 and plan["needs_plugins"] is False
    for engine in plan["engines"]:
        names = [p["name"] for p in engine["profiles"]]
        assert names == (["prefill", "decode"] if engine["role"] in ("qkv", "decoder") else ["prefill"])
        # Weight bytes against the initializers' actual arrays (loaded, not computed from dims).
        model = onnx.load(str(artifacts / engine["source"]))
        assert engine["weight_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert plan["engines"][0]["weight_bytes"] > 0 and plan["engines"][-1]["profiles"][1]["axes"]["past_sequence_length"] \
        == [77, 108, 511 - 116]
    decode = plan["engines"][-1]["profiles"][1]  # decoder_3: cache 77..395 plus the new token
    assert "--maxShapes=hidden_states:2x395x64," in decode["cross_check"]["trtexec"]
    assert "past_key_values.7.value:2x2x395x16" in decode["cross_check"]["trtexec"]
    assert decode["cross_check"]["polygraphy"].startswith(f"polygraphy run {artifacts / 'decoder_3.onnx'} --trt --onnxrt")
    text = runner.invoke(cli.cli, ["build", "--artifacts", str(artifacts), "--dry-run"])
    assert text.exit_code == 0 and "plan: 9 engines" in text.output and "dry run: nothing built" in text.output


@pytest.mark.parametrize("options, message", [
    (["--max-seq-len", "600"], "past the 512 the artifacts were exported for"),
    (["--max-seq-len", "100"], "cannot hold the 192 image tokens"),
    (["--opt-seq-len", "600"], "--opt-seq-len 600 must lie between"),
])
def test_build_refuses_lengths_the_artifacts_cannot_serve(artifacts, options, message):
    result = CliRunner().invoke(cli.cli, ["build", "--artifacts", str(artifacts), "--dry-run", *options])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.skipif(HAS_TENSORRT, reason="this machine has TensorRT: the refusal without it cannot be observed")
def test_build_and_generate_without_tensorrt_say_what_to_install(artifacts, tmp_path):
    result = CliRunner().invoke(cli.cli, ["build", "--artifacts", str(artifacts), "--out", str(tmp_path / "engines")])
    assert result.exit_code == 2
    assert "error: TensorRT is not installed" in result.output and "pip install tensorrt-cu12" in result.output
    assert "python3-libnvinfer" in result.output and not (tmp_path / "engines").exists()
    generated = CliRunner().invoke(cli.cli, ["generate", "--engines", str(tmp_path), "--image", "examples/cat.png",
                                             "--prompt", "hi"])
    assert generated.exit_code == 2 and "error: TensorRT is not installed" in generated.output


def test_generate_and_bench_trt_need_an_engine_folder():
    result = CliRunner().invoke(cli.cli, ["generate", "--backend", "trt", "--image", "examples/cat.png", "--prompt", "hi"])
    assert result.exit_code == 2 and "give --engines DIR" in result.output
    result = CliRunner().invoke(cli.cli, ["bench", "--backend", "trt"])
    assert result.exit_code == 2 and "--backend trt --engines DIR" in result.output


@pytest.mark.skipif(HAS_TENSORRT, reason="this machine has TensorRT: the refusal without it cannot be observed")
def test_bench_trt_without_tensorrt_says_what_to_install(tmp_path):
    result = CliRunner().invoke(cli.cli, ["bench", "--backend", "trt", "--engines", str(tmp_path)])
    assert result.exit_code == 2 and "error: TensorRT is not installed" in result.output


def _engine_data(artifacts, environment=ENV) -> dict:
    plan = plan_build(artifacts, BuildOptions())
    return engine_manifest(plan, environment, {"network": ["STRONGLY_TYPED"], "builder": []},
                           {e.engine: "0" * 64 for e in plan.engines})


def test_engine_manifest_records_what_the_engines_are_tied_to(artifacts):
    data = _engine_data(artifacts)
    assert data["tensorrt"] == "10.3.0.30" and data["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    manifest = read_manifest(artifacts)
    assert set(data["artifacts"]["sources"]) == {g.file for g in manifest.graphs}
    assert all(data["artifacts"]["sources"][g.file] == manifest.files[g.file] for g in manifest.graphs)
    assert data["build"]["flags"]["network"] == ["STRONGLY_TYPED"] and data["plugin_library"] is None
    check_engine_manifest(data, ENV, artifacts)  # the same machine and sources: accepted


@pytest.mark.parametrize("environment, message", [
    (Environment("10.13.3.9", "Orin", "8.7"), "built with TensorRT 10.3.0.30, this machine has 10.13.3.9"),
    (Environment("10.3.0.30", "Thor", "11.0"), "compute capability 8.7"),
])
def test_engines_refused_on_another_tensorrt_or_gpu(artifacts, environment, message):
    with pytest.raises(UserError, match=message):
        check_engine_manifest(_engine_data(artifacts), environment, artifacts)


def test_engines_refused_for_another_plugin_build(artifacts):
    data = _engine_data(artifacts)
    data["plugin_library"] = {"path": "/opt/libvisiondrop_trt_plugins.so", "sha256": "a" * 64, "version": "1"}
    with pytest.raises(UserError, match="plugin library differs"):
        check_engine_manifest(data, Environment("10.3.0.30", "Orin", "8.7", plugin_sha256="b" * 64), artifacts)
    with pytest.raises(UserError, match="was not found"):
        check_engine_manifest(data, ENV, artifacts)


def test_engines_refused_when_their_sources_changed(artifacts, tmp_path):
    data = _engine_data(artifacts)
    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy)
    check_engine_manifest(data, ENV, copy)  # an identical copy is the same source
    with (copy / "prune_1.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(UserError, match="prune_1.onnx changed since the engines were built"):
        check_engine_manifest(data, ENV, copy)
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + " ")
    with pytest.raises(UserError, match="not the artifact folder the engines were built from"):
        check_engine_manifest(data, ENV, copy)


def test_plugin_mode_plan_reports_a_missing_library_and_build_refuses(artifacts):
    plan = plan_build(artifacts, BuildOptions())
    plugin_plan = BuildPlan(plan.artifacts, plan.options, plan.max_seq_len, plan.opt_seq_len, plan.engines,
                            needs_plugins=True, plugin_library=None)
    with pytest.raises(UserError, match="uses the VisionDrop plugins: build libvisiondrop_trt_plugins.so"):
        plugin_plan.require_plugin_library()
    with pytest.raises(UserError, match="plugin_lib .* does not exist"):
        plan_build(artifacts, BuildOptions(plugin_lib=artifacts / "missing.so"))


def test_weights_are_counted_from_dims_for_every_stored_dtype():
    from visiondrop_edge.export.trt_build import weight_bytes

    arrays = [np.zeros((3, 5), np.float16), np.zeros((7,), np.int64), np.zeros((2, 2, 2), np.float32)]
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(arrays)])
    assert weight_bytes(helper.make_model(graph)) == sum(a.nbytes for a in arrays)

"""Plugin-mode export: one TensorRT plugin node per select/merge, validated on ONNX Runtime's CPU ops."""

import onnx
import pytest

from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.runtime.validate import validate_artifacts
from visiondrop_edge.plugins_trt import MERGE_OP, PLUGIN_DOMAIN, SELECT_OP
from visiondrop_edge.schedule import Schedule

BUDGETS = [32, 64, 128, 192]


@pytest.fixture(scope="module")
def plugin_artifacts(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    folders = {}
    for budget in BUDGETS:
        folders[budget] = root / f"tiny-{budget}-plugins"
        export_artifacts(tiny, Schedule.from_budget(budget, 8, 576), folders[budget], ExportOptions(plugins=True))
    return folders


@pytest.mark.parametrize("budget", BUDGETS)
def test_plugin_mode_validates_against_pytorch(plugin_artifacts, budget):
    report = validate_artifacts(plugin_artifacts[budget], batch_sizes=(1, 2), new_tokens=16, seed=60)
    assert report.passed, [c.name for c in report.checks.values() if not c.passed]
    assert report.gates["relative"] == 1e-4 and report.checks["generate: 16-token greedy ids"].passed


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_prune_is_one_select_and_one_merge_node(plugin_artifacts, budget):
    schedule = Schedule.from_budget(budget, 8, 576)
    folder = plugin_artifacts[budget]
    manifest = read_manifest(folder)
    assert manifest.export["mode"] == "plugins"
    assert manifest.export["plugins"] == {"library": "libvisiondrop_trt_plugins.so", "domain": "trt.plugins", "namespace": "visiondrop",
                                          "version": "1", "ops": [SELECT_OP, MERGE_OP]}
    graphs = ["vision_encoder"] + [f"prune_{i}" for i in range(len(schedule.llm_stages))]
    for name, stage in zip(graphs, schedule.stages):
        model = onnx.load(str(folder / f"{name}.onnx"))
        plugin_nodes = [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN]
        assert [n.op_type for n in plugin_nodes] == [SELECT_OP, MERGE_OP]
        for node, (key, value) in zip(plugin_nodes, [("k", stage.dominant), ("c", stage.contextual)]):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes == {key: value, "plugin_namespace": b"visiondrop", "plugin_version": b"1"}
            assert node.attribute[[a.name for a in node.attribute].index(key)].type == onnx.AttributeProto.INT
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"ScatterElements", "ArgMax"}  # the portable select/merge subgraphs are gone
        assert any(o.domain == PLUGIN_DOMAIN and o.version == 1 for o in model.opset_import)
        assert not any(o.domain == "visiondrop" for o in model.opset_import)

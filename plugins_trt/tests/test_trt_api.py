"""The project's TensorRT Python code against the real TensorRT 10.3 / 10.13 / 11.4 bindings.

This proves API *use* (every ``trt.X.Y``, enum member, method and keyword the code touches
exists in each targeted version, or is guarded by ``hasattr``), not behaviour: the bindings run
over a libnvinfer stub whose factories return NULL, so nothing is built or executed. See
trt_api_check.py. ``.ci/run`` installs the three ``tensorrt-cu12-bindings`` wheels into
$VISIONDROP_TRT_BINDINGS (default ~/.cache/visiondrop/trt-bindings/<version>); without them the
tests skip and say so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from trt_api_check import REPO_ROOT, check_file, dump_api
from trt_stub import build_stub

VERSIONS = ("10.3.0", "10.13.3.9", "11.4.0.106")  # JetPack 6.2, JetPack 7.x, datacenter 11.x
TRT_FILES = [REPO_ROOT / "export" / "trt_build.py", REPO_ROOT / "runtime" / "trt_backend.py",
             REPO_ROOT / "plugins_trt" / "library.py"]
# Calls the checker must have followed to their classes in every version, so that a clean
# result cannot come from code it failed to type.
MUST_RESOLVE = {
    "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_dtype",
    "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_input_shape",
    "IExecutionContext.set_tensor_address", "IExecutionContext.get_tensor_shape", "IExecutionContext.execute_async_v3",
    "IBuilderConfig.get_flag", "IPluginRegistry.load_library", "ICudaEngine.get_device_memory_size_for_profile_v2",
    "IExecutionContext.set_device_memory", "ExecutionContextAllocationStrategy.USER_MANAGED",
}


def bindings_root() -> Path:
    return Path(os.environ.get("VISIONDROP_TRT_BINDINGS") or Path.home() / ".cache" / "visiondrop" / "trt-bindings")


@pytest.fixture(scope="module")
def apis(tmp_path_factory) -> dict[str, dict]:
    root = bindings_root()
    missing = [v for v in VERSIONS if not (root / v / "tensorrt_bindings" / "tensorrt.so").is_file()]
    if missing:
        pytest.skip(f"tensorrt-cu12-bindings {', '.join(missing)} not installed under {root} (.ci/run does it: "
                    f"pip install --no-deps --target {root}/<version> tensorrt-cu12-bindings==<version>)")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build the libnvinfer stub")
    stub = build_stub(tmp_path_factory.mktemp("nvinfer_stub"))
    return {version: dump_api(root / version, stub, TRT_FILES) for version in VERSIONS}


def test_bindings_are_the_targeted_versions(apis):
    assert [api["version"] for api in apis.values()] == list(VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
def test_project_tensorrt_code_uses_only_api_of_every_target(apis, version):
    api = apis[version]
    checked, problems = set(), []
    for file in TRT_FILES:
        report = check_file(api, file, str(file.relative_to(REPO_ROOT)))
        checked |= report.checked
        problems += [str(p) for p in report.problems]
    assert not problems, f"TensorRT {version}: " + "; ".join(problems)
    assert MUST_RESOLVE <= checked, f"not followed under {version}: {sorted(MUST_RESOLVE - checked)}"


@pytest.mark.parametrize("version", VERSIONS)
def test_project_modules_import_under_every_target(apis, version):
    imports = apis[version]["imports"]
    assert sorted(imports) == sorted(str(f) for f in TRT_FILES)
    assert all(error is None for error in imports.values()), imports


def test_what_the_build_relies_on_through_polygraphy_exists_everywhere(apis):
    """Polygraphy's strongly_typed=True sets NetworkDefinitionCreationFlag.STRONGLY_TYPED."""
    for version, api in apis.items():
        assert "STRONGLY_TYPED" in api["classes"]["NetworkDefinitionCreationFlag"], version
    assert "EXPLICIT_BATCH" not in apis["11.4.0.106"]["classes"]["NetworkDefinitionCreationFlag"]


def _inject(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {source.name}: update the test's injection point"
    copy = tmp_path / source.name
    copy.write_text(text.replace(old, new))
    return copy


def _problems(apis, path: Path) -> dict[str, list[str]]:
    return {version: [str(p) for p in check_file(api, path).problems] for version, api in apis.items()}


def test_the_check_fails_on_execute_async_v2(apis, tmp_path):
    """The pre-10.0 call (removed with binding indices) is reported in every version."""
    copy = _inject(tmp_path, TRT_FILES[1], "context.execute_async_v3(stream)", "context.execute_async_v2([], stream)")
    for version, problems in _problems(apis, copy).items():
        assert any("IExecutionContext has no attribute 'execute_async_v2'" in p for p in problems), (version, problems)


def test_the_check_fails_on_builder_flag_fp16_only_where_it_is_gone(apis, tmp_path):
    """BuilderFlag.FP16 exists in 10.x and was removed in 11: reported for 11.4 only; a hasattr guard passes."""
    hook = "            built: trt.IBuilderConfig = create(builder, network)\n"
    copy = _inject(tmp_path, TRT_FILES[0], hook, hook + "            built.set_flag(trt.BuilderFlag.FP16)\n")
    problems = _problems(apis, copy)
    assert problems["10.3.0"] == [] and problems["10.13.3.9"] == [], problems
    assert any("BuilderFlag has no attribute 'FP16'" in p for p in problems["11.4.0.106"]), problems
    guarded = _inject(tmp_path, TRT_FILES[0], hook, hook + "            if hasattr(trt.BuilderFlag, \"FP16\"):\n"
                      "                built.set_flag(trt.BuilderFlag.FP16)\n")
    assert all(p == [] for p in _problems(apis, guarded).values())


def test_the_check_fails_on_device_memory_size_only_where_it_is_gone(apis, tmp_path):
    """ICudaEngine.device_memory_size (deprecated for the _v2 calls) is gone in 11.4."""
    copy = _inject(tmp_path, TRT_FILES[1], "engine.get_device_memory_size_for_profile_v2(number)",
                   "engine.device_memory_size")
    problems = _problems(apis, copy)
    assert problems["10.3.0"] == [] and problems["10.13.3.9"] == [], problems
    assert any("ICudaEngine has no attribute 'device_memory_size'" in p for p in problems["11.4.0.106"]), problems


def test_the_check_fails_on_an_unknown_keyword(apis, tmp_path):
    copy = _inject(tmp_path, TRT_FILES[1], "context.set_optimization_profile_async(number, stream)",
                   "context.set_optimization_profile_async(profile=number, stream_handle=stream)")
    for version, problems in _problems(apis, copy).items():
        assert any("takes no keyword 'profile'" in p for p in problems), (version, problems)

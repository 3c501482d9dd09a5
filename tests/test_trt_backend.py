"""The TensorRT backend and `doctor`: one-line refusals where pieces are missing (run here), and
engines against PyTorch where TensorRT and a GPU exist (marked ``trt`` and ``gpu``: skipped,
with the reason, on machines without them; nothing here has run on TensorRT yet).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from visiondrop_edge import cli
from visiondrop_edge.errors import UserError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = pytest.mark.skipif(HAS_TENSORRT, reason="this machine has TensorRT: the refusal without it cannot be observed")


@NO_TENSORRT
def test_backend_without_tensorrt_says_what_to_install(tmp_path):
    from visiondrop_edge.runtime.trt_backend import TrtBackend

    with pytest.raises(UserError) as error:
        TrtBackend(tmp_path)
    message = str(error.value)
    assert "TensorRT is not installed" in message and "pip install tensorrt-cu12" in message
    assert "python3-libnvinfer" in message and "python cli.py doctor" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the refusal without one cannot be observed")
def test_no_gpu_is_refused_with_what_to_install():
    from visiondrop_edge.runtime.trt_backend import require_gpu

    with pytest.raises(UserError, match="no CUDA GPU is visible to PyTorch: TensorRT needs an NVIDIA GPU"):
        require_gpu()


def test_doctor_reports_every_piece_and_what_is_missing(tmp_path):
    result = CliRunner().invoke(cli.cli, ["doctor", "--json", "-", "--plugin-lib", str(tmp_path / "missing.so")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("gpu", "tensorrt", "polygraphy", "plugin_library", "onnxruntime", "nvcc", "cmake", "ready_for_tensorrt"):
        assert key in report
    assert "does not exist" in report["plugin_library"]["missing"]
    if not HAS_TENSORRT:
        assert "pip install tensorrt-cu12" in report["tensorrt"]["missing"] and report["ready_for_tensorrt"] is False
    if not torch.cuda.is_available():
        assert "NVIDIA GPU" in report["gpu"]["missing"]
    built = tmp_path / "libvisiondrop_trt_plugins.so"
    built.write_bytes(b"\x7fELF")
    found = json.loads(CliRunner().invoke(cli.cli, ["doctor", "--json", "-", "--plugin-lib", str(built)]).output)
    assert found["plugin_library"] == str(built.resolve())
    text = CliRunner().invoke(cli.cli, ["doctor"]).output
    assert "tensorrt: " in text and ("MISSING - pip install tensorrt-cu12" in text) == (not HAS_TENSORRT)


# ------------------------------------------------------------------ over a stand-in TensorRT

class _FakeTensorRT(types.ModuleType):
    """Just enough of the ``tensorrt`` module for TrtBackend: each "engine" file names an ONNX
    graph that ONNX Runtime runs. Tensors are read from and written to the addresses TrtBackend
    binds (host memory here), so the test covers TrtBackend's own work: binding by name from
    the manifests, output order, profile choice per call, empty-tensor addresses, refusals."""

    __version__ = "10.3.0.30"

    class DataType:
        FLOAT, HALF, BF16, INT32, INT64, INT8, UINT8, BOOL = range(8)

    class BuilderFlag:
        TF32, STRIP_PLAN = 0, 1
        __members__ = {"TF32": 0, "STRIP_PLAN": 1}

    class ExecutionContextAllocationStrategy:
        STATIC, ON_PROFILE_CHANGE, USER_MANAGED = range(3)

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    def __init__(self):
        super().__init__("tensorrt")
        self.calls: list[tuple[str, int]] = []  # (graph, profile index) per execution
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data: bytes):
                return _FakeEngine(json.loads(data)["onnx"], fake)

        self.Runtime = Runtime


_NUMPY = {0: np.float32, 1: np.float16, 3: np.int32, 4: np.int64, 5: np.int8, 6: np.uint8, 7: np.bool_}
_ORT_TYPES = {"tensor(float)": 0, "tensor(float16)": 1, "tensor(int32)": 3, "tensor(int64)": 4, "tensor(bool)": 7}


class _FakeEngine:
    def __init__(self, path: str, module: _FakeTensorRT):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.name, self.module = Path(path).stem, module
        self.types = {t.name: _ORT_TYPES[t.type] for t in [*self.session.get_inputs(), *self.session.get_outputs()]}

    def get_tensor_dtype(self, name):
        return self.types[name]

    def create_execution_context(self, strategy):
        assert strategy == _FakeTensorRT.ExecutionContextAllocationStrategy.USER_MANAGED
        return _FakeContext(self)

    def get_device_memory_size_for_profile_v2(self, index):
        return 1000 + index


class _FakeContext:
    def __init__(self, engine: _FakeEngine):
        self.engine, self.profile, self.shapes, self.addresses, self.results, self.memory = engine, 0, {}, {}, None, 0

    def set_device_memory(self, memory, size):
        assert memory and size == 1000 + self.profile  # the profile's own size, in the shared buffer
        self.memory = memory

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def _view(self, name, shape):
        dtype = np.dtype(_NUMPY[self.engine.types[name]])
        count = int(np.prod(shape))
        if count == 0:
            return np.zeros(shape, dtype)
        buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(buffer, dtype).reshape(shape)

    def get_tensor_shape(self, name):
        if self.results is None:  # TensorRT infers output shapes from the input shapes; ORT must run for that
            feeds = {i.name: self._view(i.name, self.shapes[i.name]).copy() for i in self.engine.session.get_inputs()}
            outputs = [o.name for o in self.engine.session.get_outputs()]
            self.results = dict(zip(outputs, self.engine.session.run(None, feeds)))
        return self.results[name].shape

    def execute_async_v3(self, stream_handle):
        assert self.memory, "no scratch memory was set"
        for name, value in self.results.items():
            self._view(name, value.shape)[...] = value
        self.engine.module.calls.append((self.engine.name, self.profile))
        return True


@pytest.fixture
def stand_in_tensorrt(monkeypatch):
    from visiondrop_edge.runtime import trt_backend

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_backend, "require_gpu", lambda: ("Stand-in GPU", "8.7"))
    monkeypatch.setattr(trt_backend, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(trt_backend, "stream_handle", lambda device: 0)
    monkeypatch.setattr(trt_backend, "synchronize", lambda device: None)
    return fake


class _StandInPolygraphy:
    """Polygraphy's TensorRT loaders as `build` calls them; the saved "engine" names its graph."""

    def __init__(self):
        self.networks, self.profiles = [], []
        recorder = self

        class NetworkFromOnnxPath:
            def __init__(self, path, strongly_typed=None):
                recorder.networks.append((Path(path).name, strongly_typed))
                self.path = path

        class Profile(dict):
            def add(self, name, min, opt, max):  # noqa: A002 - Polygraphy's keyword names
                self[name] = (list(min), list(opt), list(max))
                return self

        class CreateConfig:
            def __init__(self, profiles=None, load_timing_cache=None):
                recorder.profiles.append(profiles)

            def __call__(self, builder, network):
                return types.SimpleNamespace(get_flag=lambda flag: flag == _FakeTensorRT.BuilderFlag.TF32)

        class EngineFromNetwork:
            def __init__(self, network, config, save_timing_cache=None):
                self.network, self.config = network, config

        class SaveEngine:
            def __init__(self, engine, path):
                self.engine, self.path = engine, path

            def __call__(self):
                self.engine.config(None, None)
                Path(self.path).write_text(json.dumps({"onnx": str(self.engine.network.path)}))

        self.classes = {"NetworkFromOnnxPath": NetworkFromOnnxPath, "Profile": Profile, "CreateConfig": CreateConfig,
                        "EngineFromNetwork": EngineFromNetwork, "SaveEngine": SaveEngine}


def test_the_stand_in_loaders_take_what_polygraphy_takes():
    """The real Polygraphy loaders accept every keyword `build` passes (their signatures, read here)."""
    import inspect

    import polygraphy.backend.trt as loaders

    fake = _StandInPolygraphy().classes
    for name in ("NetworkFromOnnxPath", "CreateConfig", "EngineFromNetwork", "SaveEngine"):
        used = set(inspect.signature(fake[name].__init__).parameters) - {"self"}
        real = set()  # named parameters along the class hierarchy (CreateConfig forwards **kwargs to its base)
        for cls in getattr(loaders, name).__mro__:
            if "__init__" in vars(cls):
                real |= {p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind != p.VAR_KEYWORD}
        assert used <= real, (name, used - real)
    assert list(inspect.signature(loaders.Profile.add).parameters) == ["self", "name", "min", "opt", "max"]


@pytest.fixture
def stand_in_polygraphy(monkeypatch, stand_in_tensorrt):
    import polygraphy.backend.trt as loaders

    fake = _StandInPolygraphy()
    for name, cls in fake.classes.items():
        monkeypatch.setattr(loaders, name, cls)
    return fake


def _build(artifacts: Path, engines: Path, max_batch: int) -> dict:
    """`build` as the CLI runs it, over the stand-ins."""
    from visiondrop_edge.export.trt_build import BuildOptions, build_engines, plan_build
    from visiondrop_edge.runtime.trt_backend import current_environment

    plan = plan_build(artifacts, BuildOptions(max_batch=max_batch))
    return build_engines(plan, engines, current_environment(None))


@pytest.fixture(scope="module")
def portable_artifacts(tiny, tmp_path_factory):
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
    from visiondrop_edge.schedule import Schedule

    folder = tmp_path_factory.mktemp("trt-backend") / "tiny-64"
    export_artifacts(tiny, Schedule.from_budget(64, 8, 576), folder, ExportOptions(max_seq_len=512))
    return folder


def test_build_hands_polygraphy_the_plan_and_writes_the_engine_manifest(stand_in_polygraphy, portable_artifacts, tmp_path):
    from visiondrop_edge.export.trt_build import BuildOptions, plan_build

    engines = tmp_path / "engines"
    manifest = _build(portable_artifacts, engines, max_batch=2)
    plan = plan_build(portable_artifacts, BuildOptions(max_batch=2))
    assert stand_in_polygraphy.networks == [(e.source, True) for e in plan.engines]  # every graph, strongly typed
    for engine, profiles in zip(plan.engines, stand_in_polygraphy.profiles):
        assert [dict(p) for p in profiles] == [{n: tuple(s) for n, s in p.shapes.items()} for p in engine.profiles]
    assert manifest["build"]["flags"] == {"network": ["STRONGLY_TYPED"], "builder": ["TF32"]}
    assert manifest["tensorrt"] == "10.3.0.30" and manifest["gpu"]["compute_capability"] == "8.7"
    assert sorted(p.name for p in engines.iterdir()) == sorted(["manifest.json", *(e.engine for e in plan.engines)])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_backend_binds_by_name_and_picks_the_profile_per_call(stand_in_polygraphy, stand_in_tensorrt,
                                                              portable_artifacts, tmp_path):
    """TrtBackend over the stand-in validates like any candidate (fp32 gates, PyTorch reference)."""
    from visiondrop_edge.runtime.validate import validate_artifacts
    from visiondrop_edge.runtime.trt_backend import TrtBackend

    engines = tmp_path / "engines"
    _build(portable_artifacts, engines, max_batch=2)
    report = validate_artifacts(portable_artifacts, candidate="trt", engines=engines, batch_sizes=(1, 2), new_tokens=4,
                                seed=3)  # what `validate --candidate trt --engines DIR` runs
    assert report.passed, [c.name for c in report.checks.values() if c.gated and not c.passed]
    calls = set(stand_in_tensorrt.calls)
    # qkv/decoder: profile 0 (prefill) for prompts, 1 (decode) for single tokens; vision and prunes: 0 only.
    assert {("decoder_0", 0), ("decoder_0", 1), ("qkv_0", 0), ("qkv_0", 1), ("vision_encoder", 0), ("prune_2", 0)} <= calls
    assert not {c for c in calls if c[0].startswith(("vision", "prune")) and c[1] != 0}
    with pytest.raises(UserError, match="outside the engine's profile"):  # batch 3 > --max-batch 2
        TrtBackend(engines, portable_artifacts).run_vision(torch.zeros(3, 3, 336, 336))


def test_prefix_reuse_runs_on_engines(stand_in_polygraphy, stand_in_tensorrt, portable_artifacts, tiny, tmp_path):
    """A question prefilled on a reused prefix (several tokens on a cache) takes the decode
    profile and answers exactly like a full prefill on the same engines."""
    from visiondrop_edge.runtime.generate import greedy_generate
    from visiondrop_edge.runtime.session import Session
    from visiondrop_edge.runtime.trt_backend import TrtBackend
    from visiondrop_edge.prompt import build_prompts, pixel_values, random_images

    engines = tmp_path / "engines"
    _build(portable_artifacts, engines, max_batch=2)
    backend = TrtBackend(engines, portable_artifacts)
    spec = backend.spec
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=8))
    questions = ["What is in this image?", "Which colour dominates?"]
    session = Session(backend, tiny.processor, "tiny")
    [prefix] = session.encode_prefix(pixels)
    answer = session.answer([prefix] * 2, questions, 4)
    batch = build_prompts(tiny.tokenizer, spec.prompt_template, questions, spec.schedule.image_tokens, spec.image_token_id, spec.pad_token_id)
    assert torch.equal(answer.tokens, greedy_generate(backend, pixels.expand(2, -1, -1, -1), batch, 4).tokens)
    assert ("qkv_0", 1) in stand_in_tensorrt.calls and ("decoder_3", 1) in stand_in_tensorrt.calls


def test_a_continuation_next_to_the_longest_cache_fits_the_decode_profile(stand_in_polygraphy, stand_in_tensorrt,
                                                                           portable_artifacts, tiny, tmp_path):
    """Cache buffers are whole blocks, so a buffer plus a continuation can pass the longest
    conversation although the conversation itself fits: the engines take it (they refused the
    mask's length once), and the logits are PyTorch's (tolerance of test_pipeline: fp32, 1e-4)."""
    from visiondrop_edge.runtime.torch_backend import TorchBackend
    from visiondrop_edge.runtime.trt_backend import TrtBackend
    from visiondrop_edge.prompt import build_prompts, pixel_values, random_images

    engines = tmp_path / "engines"
    _build(portable_artifacts, engines, max_batch=1)
    backends = [TrtBackend(engines, portable_artifacts)]
    spec = backends[0].spec
    backends.append(TorchBackend(tiny, spec.schedule))
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=9))
    batch = build_prompts(tiny.tokenizer, spec.prompt_template, ["What is in this image?"], spec.schedule.image_tokens,
                          spec.image_token_id, spec.pad_token_id)
    filler = 511 - 20 - 6 - batch.input_ids.shape[1]  # the longest conversation is 511 tokens (max_seq_len 512 - 1)
    words = batch.input_ids[:, -8:]  # the prompt's last tokens, repeated
    text, question = words.repeat(1, filler // 8 + 1)[:, :filler], words.repeat(1, 3)[:, :20]
    results = []
    for backend in backends:
        vision = backend.encode_image(pixels)
        prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
        _, state = backend.extend(text, torch.ones_like(text), prefill.state)
        results.append(backend.extend(question, torch.ones_like(question), state)[0])
    assert results[0].shape == results[1].shape
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_generate_and_bench_run_engine_folders(stand_in_polygraphy, stand_in_tensorrt, portable_artifacts, tiny,
                                              tmp_path):
    """The CLI paths: generate --engines answers like --artifacts; bench --backend trt measures each folder."""
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
    from visiondrop_edge.schedule import Schedule

    engines = tmp_path / "engines"
    _build(portable_artifacts, engines, max_batch=1)
    question = ["--image", "examples/cat.png", "--prompt", "What is this?", "--max-new-tokens", "4", "--json", "-"]
    on_engines = CliRunner().invoke(cli.cli, ["generate", "--engines", str(engines), *question])
    on_graphs = CliRunner().invoke(cli.cli, ["generate", "--artifacts", str(portable_artifacts), *question])
    assert on_engines.exit_code == 0 and on_graphs.exit_code == 0, on_engines.output + on_graphs.output
    engines_answer, graphs_answer = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (on_engines, on_graphs))
    assert engines_answer["backend"] == "trt" and engines_answer["generated_ids"] == graphs_answer["generated_ids"]

    full = tmp_path / "tiny-full"
    export_artifacts(tiny, Schedule.full(8, 576), full, ExportOptions(max_seq_len=700))
    _build(full, tmp_path / "engines-full", max_batch=1)
    report_path = tmp_path / "bench.json"
    bench = CliRunner().invoke(cli.cli, ["bench", "--backend", "trt", "--engines", str(tmp_path / "engines-full"),
                                         "--engines", str(engines), "--batch", "1", "--max-new-tokens", "2", "--warmup", "0",
                                         "--repeats", "1", "--json", str(report_path)])
    assert bench.exit_code == 0, bench.output
    rows = json.loads(report_path.read_text())["results"]
    assert [(r["budget"], r["batch"]) for r in rows] == [("full", 1), (Schedule.from_budget(64, 8, 576).describe(), 1)]
    assert "prefill_speedup" in rows[1] and "prefill_speedup" not in rows[0]


def test_a_plugin_library_is_registered_once_per_process(stand_in_tensorrt, tmp_path):
    """Two backends (or build then run) in one process must not register the creators twice."""
    import shutil
    import subprocess

    from visiondrop_edge.plugins_trt.library import load_plugin_library

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a library that exports getCreators")
    source = tmp_path / "creators.c"
    source.write_text("void* getCreators(int* n) { *n = 0; return 0; }\n")
    library = tmp_path / "libcreators.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    loaded = []
    stand_in_tensorrt.get_plugin_registry = lambda: types.SimpleNamespace(load_library=lambda p: loaded.append(p) or 1)
    assert load_plugin_library(library) == load_plugin_library(tmp_path / "." / "libcreators.so") == "getCreators"
    assert loaded == [str(library.resolve())]


def test_backend_refuses_engines_it_must_not_run(stand_in_polygraphy, stand_in_tensorrt, portable_artifacts, tmp_path):
    from visiondrop_edge.runtime.trt_backend import TrtBackend

    engines = tmp_path / "engines"
    _build(portable_artifacts, engines, max_batch=1)
    stand_in_tensorrt.__version__ = "10.13.3.9"
    with pytest.raises(UserError, match="built with TensorRT 10.3.0.30, this machine has 10.13.3.9"):
        TrtBackend(engines, portable_artifacts)
    stand_in_tensorrt.__version__ = "10.3.0.30"
    with (engines / "decoder_1.engine").open("a") as handle:
        handle.write(" ")
    with pytest.raises(UserError, match="decoder_1.engine is missing or changed after the build"):
        TrtBackend(engines, portable_artifacts)


# ------------------------------------------------------------------ with TensorRT and a GPU

@pytest.mark.trt
@pytest.mark.gpu
def test_engines_match_pytorch_and_refuse_another_tensorrt(tiny, tmp_path):
    """Build the tiny model's engines, validate them like any candidate, then tamper the manifest."""
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
    from visiondrop_edge.export.trt_build import BuildOptions, build_engines, plan_build
    from visiondrop_edge.runtime.validate import validate_artifacts
    from visiondrop_edge.runtime.trt_backend import TrtBackend, current_environment
    from visiondrop_edge.schedule import Schedule

    artifacts, engines = tmp_path / "tiny-64", tmp_path / "engines"
    export_artifacts(tiny, Schedule.from_budget(64, 8, 576), artifacts, ExportOptions(max_seq_len=512))
    plan = plan_build(artifacts, BuildOptions(max_batch=2))
    manifest = build_engines(plan, engines, current_environment(None))
    assert [e["graph"] for e in manifest["engines"]] == [e.graph for e in plan.engines]
    report = validate_artifacts(artifacts, candidate="trt", engines=engines, batch_sizes=(1, 2), new_tokens=8,
                                device="cuda")
    assert report.passed, [c.name for c in report.checks.values() if c.gated and not c.passed]
    data = json.loads((engines / "manifest.json").read_text())
    data["tensorrt"] = "0.0.0"
    (engines / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="built with TensorRT 0.0.0"):
        TrtBackend(engines, artifacts)

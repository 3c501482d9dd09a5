"""The TensorRT backend and `doctor`: one-line refusals where pieces are missing (run here), and
engines against PyTorch where TensorRT and a GPU exist (marked ``trt`` and ``gpu``: skipped,
with the reason, on machines without them; nothing here has run on TensorRT yet).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

import cli
from visiondrop.errors import UserError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TENSORRT = pytest.mark.skipif(HAS_TENSORRT, reason="this machine has TensorRT: the refusal without it cannot be observed")


@NO_TENSORRT
def test_backend_without_tensorrt_says_what_to_install(tmp_path):
    from runtime.trt_backend import TrtBackend

    with pytest.raises(UserError) as error:
        TrtBackend(tmp_path)
    message = str(error.value)
    assert "TensorRT is not installed" in message and "pip install tensorrt-cu12" in message
    assert "python3-libnvinfer" in message and "python cli.py doctor" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the refusal without one cannot be observed")
def test_no_gpu_is_refused_with_what_to_install():
    from runtime.trt_backend import require_gpu

    with pytest.raises(UserError, match="no CUDA GPU is visible to PyTorch: TensorRT needs an NVIDIA GPU"):
        require_gpu()


def test_doctor_reports_every_piece_and_what_is_missing(tmp_path):
    result = CliRunner().invoke(cli.cli, ["doctor", "--json", "--plugin-lib", str(tmp_path / "missing.so")])
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
    found = json.loads(CliRunner().invoke(cli.cli, ["doctor", "--json", "--plugin-lib", str(built)]).output)
    assert found["plugin_library"] == str(built.resolve())
    text = CliRunner().invoke(cli.cli, ["doctor"]).output
    assert "tensorrt: " in text and ("MISSING - pip install tensorrt-cu12" in text) == (not HAS_TENSORRT)


# ------------------------------------------------------------------ with TensorRT and a GPU

@pytest.mark.trt
@pytest.mark.gpu
def test_engines_match_pytorch_and_refuse_another_tensorrt(tiny, tmp_path):
    """Build the tiny model's engines, validate them like any candidate, then tamper the manifest."""
    from export.onnx_export import ExportOptions, export_artifacts
    from export.trt_build import BuildOptions, build_engines, plan_build
    from export.validate import validate_artifacts
    from runtime.trt_backend import TrtBackend, current_environment
    from visiondrop.schedule import Schedule

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

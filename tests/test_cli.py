"""The CLI as a user meets it: answers, traces, and one-line errors (exit 2) for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from visiondrop_edge import cli
from visiondrop_edge.loading import builtin_dir
from visiondrop_edge.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((240, 320, 3)) * 255).astype("uint8")).save(path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def one_line_error(result, fragment):
    """Exit 2, and the last stderr line is the only error line, naming the problem."""
    lines = result.stderr.strip().splitlines()
    return (
        result.exit_code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1]
        and sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    )


def test_generate_writes_a_trace(image, tmp_path):
    trace = tmp_path / "trace.json"
    result = invoke("generate", "--model", "tiny", "--image", image, "--prompt", "What is this?", "--budget", "64",
                    "--max-new-tokens", "5", "--trace", trace, "--json", "-")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    data = json.loads(trace.read_text())
    schedule = Schedule.from_budget(64, 8, 576)
    assert data["schedule"]["spec"] == schedule.describe() == answer["schedule"]
    counts = [(len(s["kept_index"][0]), len(s["target_index"][0])) for s in data["stages"]]
    assert counts == [(s.dominant, s.contextual) for s in schedule.stages]
    assert data["stages"][0]["kept_index"][0][0] == 0  # CLS is always kept
    assert len(data["first_logits_top20"][0]["ids"]) == 20
    assert data["generated_ids"] == answer["generated_ids"] and 1 <= len(answer["generated_ids"][0]) <= 5


def test_tiny_checkpoint_round_trips_through_from_pretrained(tmp_path, image):
    out = tmp_path / "tiny"
    assert invoke("tiny", "--out", out).exit_code == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert one_line_error(invoke("tiny", "--out", out), "exists and is not empty: pass --force to replace it")  # the CLI's spelling
    from_dir = invoke("generate", "--model", out, "--image", image, "--prompt", "hi", "--budget", "32", "--max-new-tokens", "4", "--json", "-")
    from_cache = invoke("generate", "--model", "tiny", "--image", image, "--prompt", "hi", "--budget", "32", "--max-new-tokens", "4", "--json", "-")
    assert from_dir.exit_code == 0 and json.loads(from_dir.stdout)["generated_ids"] == json.loads(from_cache.stdout)["generated_ids"]


def broken_models(tmp_path):
    missing = tmp_path / "does-not-exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage_config = tmp_path / "garbage-config"
    garbage_config.mkdir()
    (garbage_config / "config.json").write_text("{not json")
    not_llava = tmp_path / "llama"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    corrupt_weights = tmp_path / "corrupt-weights"
    corrupt_weights.mkdir()
    for f in builtin_dir("tiny").iterdir():
        (corrupt_weights / f.name).write_bytes(b"\0garbage" if f.suffix == ".safetensors" else f.read_bytes())
    return {
        missing: "neither a built-in preset",
        empty: "no config.json",
        garbage_config: "not valid JSON",
        not_llava: "which no model family here handles",
        corrupt_weights: "could not load the weights",
    }


def test_bad_models_fail_with_one_line(tmp_path, image):
    for path, fragment in broken_models(tmp_path).items():
        result = invoke("generate", "--model", path, "--image", image, "--prompt", "hi")
        assert one_line_error(result, fragment), (path, result.output)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--budget", "600"], "between 1 and 385"),
        (["--budget", "many"], "not a positive integer"),
        (["--schedule", "42+6,8:50+5"], "invalid schedule"),
        (["--budget", "32", "--schedule", "42+6"], "not both"),
    ],
)
def test_bad_budgets_fail_with_one_line(image, extra, fragment):
    result = invoke("generate", "--image", image, "--prompt", "hi", *extra)
    assert one_line_error(result, fragment), result.output


def test_bad_images_fail_with_one_line(tmp_path):
    unreadable = tmp_path / "fake.png"
    unreadable.write_text("this is not an image")
    for path, fragment in [(unreadable, "cannot read image"), (tmp_path / "missing.png", "does not exist")]:
        result = invoke("generate", "--image", path, "--prompt", "hi")
        assert one_line_error(result, fragment), result.output


def test_cli_runs_as_a_script(image):
    """The real entry point: a fresh interpreter, exit code and output as a user sees them."""
    ok = subprocess.run([sys.executable, "cli.py", "generate", "--image", image, "--prompt", "hi", "--budget", "32", "--max-new-tokens", "3"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "cli.py", "generate", "--image", image, "--prompt", "hi", "--budget", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: budget '0'")
    assert "Traceback" not in bad.stderr
    help_text = subprocess.run([sys.executable, "cli.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "generate" in help_text and "tiny" in help_text


# ------------------------------------------------------------------ one spelling per option
SHARED = ("--json", "--max-new-tokens", "--device", "--provider", "--dtype", "--model", "--budget", "--schedule", "--cuda-graph")


def option_signature(param):
    """What a user can type and what it means: the type, its choices or range, the flag value (not the default)."""
    return (type(param.type).__name__, getattr(param.type, "choices", None), getattr(param.type, "min", None),
            getattr(param.type, "max", None), param.is_flag, param.multiple)


def test_an_option_means_the_same_in_every_command():
    """Each shared option has one type and value set wherever it appears; the retired spellings are gone."""
    found: dict[str, dict[str, tuple]] = {}
    for name, command in cli.cli.commands.items():
        for param in command.params:
            assert not {"--new-tokens"} & set(param.opts), name
            if param.opts[0] in SHARED:
                found.setdefault(param.opts[0], {})[name] = option_signature(param)
    for option, signatures in found.items():
        assert len(signatures) >= 2 and len(set(signatures.values())) == 1, (option, signatures)
    assert set(found) == set(SHARED)
    vision_dtype = next(p for p in cli.cli.commands["export"].params if p.opts[0] == "--vision-dtype")
    assert option_signature(vision_dtype) == found["--dtype"]["export"]  # one precision list
    # Every command with a report takes --json PATH|-; the provider default is the same where there is one.
    assert set(found["--json"]) == {"generate", "export", "calibrate", "build", "doctor", "validate", "inspect", "bench"}
    defaults = {c.name: p.default for c in cli.cli.commands.values() for p in c.params if p.opts[0] == "--provider"}
    assert set(defaults.values()) == {"auto"}, defaults


def test_json_dash_prints_the_report_that_json_path_writes(image, tmp_path):
    """--json - puts the JSON alone on stdout; --json PATH writes the same JSON and leaves the answers on stdout."""
    args = ["generate", "--image", image, "--prompt", "What is this?", "--budget", "32", "--max-new-tokens", "4"]
    printed = invoke(*args, "--json", "-")
    assert printed.exit_code == 0, printed.output
    report = json.loads(printed.stdout)
    path = tmp_path / "report.json"
    written = invoke(*args, "--json", path)
    assert written.exit_code == 0, written.output
    assert json.loads(path.read_text()) == report
    assert written.stdout.splitlines() == report["answers"]
    assert f"wrote {path}" in written.stderr


def test_the_old_bare_json_flag_gets_the_new_spelling(tmp_path):
    for args in (["doctor", "--json"], ["doctor", "--json", "--plugin-lib", tmp_path / "x.so"], ["build", "--artifacts", tmp_path, "--json"]):
        result = invoke(*args)
        last = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 2 and "Invalid value for '--json'" in last and "--json - to print" in last, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written under a name that was an option


def test_a_gpu_that_is_not_there_is_one_line_before_anything_loads(image, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["generate", "--image", image, "--prompt", "hi", "--device", "cuda"],
                 ["validate", "--artifacts", tmp_path / "none", "--device", "cuda:0"],
                 ["bench", "--model", "tiny", "--device", "cuda"]):
        result = invoke(*args)
        assert one_line_error(result, "PyTorch sees no CUDA GPU: use --device cpu"), (args, result.output)
        assert "loading" not in result.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = invoke("bench", "--model", "tiny", "--device", "cuda:2")
    assert one_line_error(result, "PyTorch sees 2 CUDA GPU(s), cuda:0..cuda:1"), result.output


def test_cuda_graph_off_the_pytorch_backend_on_a_gpu_is_one_line_before_anything_loads(image, tmp_path, monkeypatch):
    """--cuda-graph records the PyTorch backend's calls on a GPU: a CPU device or exported graphs are refused first."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the refusal must not depend on the machine
    for args in (["generate", "--image", image, "--prompt", "hi", "--cuda-graph"],
                 ["generate", "--image", image, "--prompt", "hi", "--artifacts", tmp_path, "--device", "cuda", "--cuda-graph"],
                 ["chat", "--image", image, "--backend", "trt", "--engines", tmp_path, "--device", "cuda", "--cuda-graph"],
                 ["bench", "--model", "tiny", "--backend", "ort", "--device", "cuda", "--cuda-graph"],
                 ["bench", "--model", "tiny", "--cuda-graph"]):
        result = invoke(*args)
        assert one_line_error(result, "--cuda-graph replays recorded CUDA graphs of the PyTorch backend: use it with "
                                      "--backend torch --device cuda"), (args, result.output)
        assert "loading" not in result.stderr
    assert "--cuda-graph" not in {opt for p in cli.cli.commands["serve"].params for opt in p.opts}  # streams interleave steps


def test_validate_takes_the_provider_like_every_other_command(tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = invoke("validate", "--artifacts", tmp_path / "none", "--provider", "cuda")
    assert one_line_error(result, "ONNX Runtime here has no CUDAExecutionProvider"), result.output
    assert "loading" not in result.stderr  # refused before the reference model loads
    retired = invoke("validate", "--artifacts", tmp_path / "none", "--candidate", "ort-cuda")
    assert retired.exit_code == 2 and "'ort-cuda' is not one of 'ort', 'trt'" in retired.stderr

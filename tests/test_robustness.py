"""Bad input and faults, as a new user meets them: one `error:` line and exit 2, nothing lost.

One test per defect class of issue 14's catalogue: --force and concurrent or killed writers
(the folder or checkpoint is intact afterwards), a manifest that cannot vouch for itself,
config checks before transformers runs, images read as Hugging Face reads them, prompt
length, output paths checked before the model loads, the built-in cache, option values.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from visiondrop_edge import cli
from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.errors import ArtifactError, ConcurrentWriteError, UserError
from visiondrop_edge.loading import builtin_dir, load_model, sha256_file, write_atomically
from visiondrop_edge.prompt import load_images
from visiondrop_edge.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def one_line_error(result, fragment):
    """Exit 2, one `error:` line (the last), naming the problem, and no traceback."""
    lines = result.stderr.strip().splitlines()
    return (
        result.exit_code == 2 and bool(lines) and lines[-1].startswith("error: ") and fragment in lines[-1]
        and sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    )


def usage_error(result, option):
    """Click's own refusal of an option value: exit 2, the last line names the option."""
    last = result.stderr.strip().splitlines()[-1]
    return result.exit_code == 2 and last.startswith("Error: Invalid value for") and option in last


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".visiondrop-" in p.name)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((np.random.default_rng(5).random((200, 260, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    """A budget-32 export (vision + 3 LLM stages), copied by each test that tampers with it."""
    out = tmp_path_factory.mktemp("robust") / "tiny-32"
    export_artifacts(tiny, Schedule.from_budget(32, 8, 576), out, ExportOptions())
    return out


def our_fill(folder: Path, scratch: Path, marker: str = "new") -> None:
    """A stand-in for an export: our manifest (so --force may replace it) and one file."""
    (folder / "manifest.json").write_text(json.dumps({"format": "visiondrop-edge/artifacts", "marker": marker}))
    (folder / "data.bin").write_bytes(marker.encode())


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------ --force never deletes what we did not write
def test_force_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "keep").write_text("user data")
    monkeypatch.chdir(tmp_path)
    result = invoke("export", "--budget", "full", "--out", ".", "--force")
    assert one_line_error(result, "is the current folder"), result.output
    assert "loading" not in result.stderr  # refused before the model loads
    assert (tmp_path / "keep").read_text() == "user data" and leftovers(tmp_path.parent) == []
    result = invoke("export", "--budget", "full", "--out", "..", "--force")  # a parent of the current folder
    assert one_line_error(result, "contains it"), result.output


def test_force_refuses_the_model_folder_and_its_parent(tmp_path):
    model = tmp_path / "models" / "ckpt"
    assert invoke("tiny", "--out", model).exit_code == 0  # an HF checkpoint this tool wrote (so "ours")
    before = snapshot(model)
    for out in (model, model.parent):
        result = invoke("export", "--model", model, "--budget", "full", "--out", out, "--force")
        assert one_line_error(result, "which the model is read from"), result.output
    assert snapshot(model) == before


def test_force_refuses_symlinks_and_folders_we_did_not_write(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("user data")
    result = invoke("export", "--budget", "full", "--out", theirs, "--force")
    assert one_line_error(result, "was not written by visiondrop"), result.output
    link = tmp_path / "link"
    link.symlink_to(theirs)
    result = invoke("export", "--budget", "full", "--out", link, "--force")
    assert one_line_error(result, "is a symbolic link"), result.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert one_line_error(invoke("export", "--budget", "full", "--out", afile, "--force"), "is a file, not a folder")
    assert (theirs / "notes.txt").read_text() == "user data" and afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "theirs"]


def test_force_replaces_our_folder_atomically(tmp_path):
    target = tmp_path / "out"
    write_atomically(target, our_fill)
    (target / "extra").write_text("from the old export")

    def crash(folder, scratch):
        our_fill(folder, scratch)
        raise KeyboardInterrupt  # interrupted before the swap: the old folder stays whole

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, crash, force=True)
    assert (target / "extra").exists() and leftovers(tmp_path) == []
    with pytest.raises(UserError, match="pass force to replace it"):
        write_atomically(target, our_fill)
    write_atomically(target, lambda f, s: our_fill(f, s, "second"), force=True)
    assert sorted(p.name for p in target.iterdir()) == ["data.bin", "manifest.json"]
    assert (target / "data.bin").read_text() == "second" and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    write_atomically(empty, our_fill)  # an empty folder is fine without --force
    assert (empty / "data.bin").exists()


def test_a_full_disk_is_one_line_and_leaves_the_old_folder(tmp_path):
    target = write_atomically(tmp_path / "out", lambda f, s: our_fill(f, s, "old"))

    def disk_full(folder, scratch):
        (folder / "part.onnx").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(folder / "part.onnx"))

    with pytest.raises(UserError, match=r"writing .*out failed \(No space left on device: .*part.onnx\); .* was left as it was"):
        write_atomically(target, disk_full, force=True)
    assert (target / "data.bin").read_text() == "old" and leftovers(tmp_path) == []


def test_files_and_folders_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        def fill(folder, scratch):
            our_fill(folder, scratch)
            (folder / "sub").mkdir(mode=0o700)
            fd = os.open(folder / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors does
            os.close(fd)

        target = write_atomically(tmp_path / "out", fill)
    finally:
        os.umask(old)
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert oct((target / "sub").stat().st_mode & 0o777) == oct(0o755)
    assert oct((target / "private.bin").stat().st_mode & 0o777) == oct(0o644)
    from visiondrop_edge.trace import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "trace.json", {"a": 1})  # written via mkstemp, which makes 0600 files
    finally:
        os.umask(old)
    assert oct((tmp_path / "trace.json").stat().st_mode & 0o777) == oct(0o644)


# ------------------------------------------------------------------ concurrent and killed writers
def test_a_second_concurrent_writer_is_refused(tmp_path):
    target = tmp_path / "out"
    seen = []

    def fill(folder, scratch):
        with pytest.raises(ConcurrentWriteError, match=rf"being written by another visiondrop process \(pid {os.getpid()}\)"):
            write_atomically(target, our_fill)  # a second writer while the first holds the lock
        seen.append(True)
        our_fill(folder, scratch, "first")

    write_atomically(target, fill)
    assert seen and (target / "data.bin").read_text() == "first" and leftovers(tmp_path) == []


def test_an_error_names_settings_in_each_callers_spelling():
    """Library code names a setting by its parameter; the CLI spells it as its option. Values are
    filled in as they are, braces included."""
    from visiondrop_edge.cli import option_spelling
    from visiondrop_edge.errors import OutputError

    error = OutputError.naming("{target} exists: pass {force} or change {max_seq_len}", target="/tmp/{odd}")
    assert str(error) == "/tmp/{odd} exists: pass force or change max_seq_len"
    assert error.spelled(option_spelling) == "/tmp/{odd} exists: pass --force or change --max-seq-len"
    assert UserError("plain {not a field}").spelled(option_spelling) == "plain {not a field}"


def test_leftovers_of_dead_writers_are_cleaned_and_an_aside_folder_restored(tmp_path, caplog):
    target = tmp_path / "out"
    write_atomically(target, lambda f, s: our_fill(f, s, "old"))
    pid = dead_pid()
    stale = tmp_path / f".out.visiondrop-staging-{pid}"
    (stale / "scratch").mkdir(parents=True)
    target.rename(tmp_path / f".out.visiondrop-replaced-{pid}")  # a crash between the two renames
    (tmp_path / "unrelated.visiondrop-staging-1").mkdir()  # not this target's: left alone
    with caplog.at_level("WARNING", logger="visiondrop"), pytest.raises(UserError, match="pass force to replace it"):
        write_atomically(target, our_fill)  # restores the old folder, which then is not replaced without --force
    assert (target / "data.bin").read_text() == "old"
    assert leftovers(tmp_path) == ["unrelated.visiondrop-staging-1"]
    assert f"restored {target}" in caplog.text and f"removed {stale}" in caplog.text


def test_kill_9_mid_export_then_a_rerun_cleans_up(tmp_path):
    """A real export process: a second writer meanwhile is refused; after kill -9 the next run cleans up."""
    target = tmp_path / "art"
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    child = subprocess.Popen([sys.executable, "cli.py", "export", "--budget", "32", "--out", str(target)],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:
            if line.startswith("[2/"):
                break
        else:
            pytest.fail(f"the export ended early (rc {child.wait()})")
        os.kill(child.pid, signal.SIGSTOP)  # frozen mid-export, holding the lock: no race with its end
        second = invoke("export", "--budget", "full", "--out", target)
        assert one_line_error(second, f"being written by another visiondrop process (pid {child.pid})"), second.output
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    staging = tmp_path / f".art.visiondrop-staging-{child.pid}"
    assert not target.exists() and (staging / "scratch").is_dir()  # the traces were beside the target ...
    ours_in_tmp = [p for p in (tmp_path / "tmp").rglob("*") if "visiondrop" in p.name or p.suffix == ".onnx"]
    assert ours_in_tmp == []  # ... and not in $TMPDIR (it once held visiondrop-trace-* folders)
    rerun = invoke("export", "--budget", "full", "--out", target)
    assert rerun.exit_code == 0, rerun.output
    assert f"removed {staging}, left by an interrupted write (pid {child.pid})" in rerun.stderr
    assert leftovers(tmp_path) == [] and read_manifest(target).spec["schedule"]["stages"] == []


# ------------------------------------------------------------------ a manifest that cannot vouch for itself
def tampered(artifacts, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    result = edit(data, copy)
    if result is not None:
        path.write_bytes(result)
    else:
        path.write_text(json.dumps(data))
    return copy


def drop_entry(data, copy):
    # The classic attack: change a weight file and drop its hash (files: {} would drop them all).
    blob = bytearray((copy / "decoder_3.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (copy / "decoder_3.onnx").write_bytes(bytes(blob))
    del data["files"]["decoder_3.onnx"]


def drop_tokenizer_entry(data, copy):
    del data["files"]["tokenizer.json"]


def empty_files(data, copy):
    data["files"] = {}


def edit_vision_count(data, copy):
    for schedule in (data["schedule"], data["spec"]["schedule"]):
        schedule["stages"][0]["dominant"] -= 2


def edit_top_level_schedule(data, copy):
    data["schedule"]["stages"][1]["dominant"] += 1


def drop_a_stage(data, copy):
    for schedule in (data["schedule"], data["spec"]["schedule"]):
        schedule["stages"].pop()


def impossible_schedule(data, copy):
    for schedule in (data["schedule"], data["spec"]["schedule"]):
        schedule["stages"][1]["dominant"] = 999  # more than the 48 tokens the stage receives


def edit_graph_output(data, copy):
    prune = next(g for g in data["graphs"] if g["name"] == "prune_1")
    next(o for o in prune["outputs"] if o["name"] == "kept_index")["shape"][1] += 3


def edit_count_everywhere(data, copy):
    """A careful forger: schedule and every recorded shape agree, but the graph file says 42."""
    for schedule in (data["schedule"], data["spec"]["schedule"]):
        schedule["stages"][0]["dominant"] -= 2
    vision = next(g for g in data["graphs"] if g["role"] == "vision")
    for output in vision["outputs"]:
        if output["name"] in ("image_embeds", "kept_index"):
            output["shape"][1] -= 2
    prune = next(g for g in data["graphs"] if g["name"] == "prune_0")
    next(o for o in prune["outputs"] if o["name"] == "scores")["shape"][1] -= 2


def add_unlisted_file(data, copy):
    (copy / "notes.txt").write_text("not from export")


def remove_listed_file(data, copy):
    (copy / "qkv_0.onnx").unlink()


def fp64(data, copy):
    data["export"]["dtype"] = "fp64"


def quantization_not_an_object(data, copy):
    data["export"]["quantization"] = "int8"


def float64_tensor(data, copy):
    data["graphs"][0]["outputs"][0]["dtype"] = "float64"


def string_count(data, copy):
    data["spec"]["schedule"]["stages"][0]["dominant"] = "42"


def path_in_files(data, copy):
    data["graphs"][0]["file"] = "../outside.onnx"


TAMPERS = [
    (drop_entry, "uses decoder_3.onnx but does not list its hash"),
    (drop_tokenizer_entry, "tokenizer.json is not listed in the manifest"),
    (empty_files, "files: Dictionary should have at least 1 item"),
    (edit_vision_count, "vision_encoder output image_embeds has shape ['batch_size', 48, 64], but its schedule 40+6"),
    (edit_top_level_schedule, "top-level schedule differs from spec.schedule"),
    (drop_a_stage, "(3 decoder groups) does not match its graphs (differing: decoder_3, prune_2)"),
    (impossible_schedule, "manifest.json contradicts itself: its schedule is invalid"),
    (edit_graph_output, "prune_1 output kept_index has shape ['batch_size', 25]"),
    (edit_count_everywhere, "does not describe vision_encoder.onnx (output image_embeds is float32 ['batch_size', 48, 64]"),
    (add_unlisted_file, "notes.txt is not listed in the manifest"),
    (remove_listed_file, "qkv_0.onnx is listed in the manifest but missing"),
    (fp64, "export.dtype: Input should be 'fp32' or 'fp16'"),
    (quantization_not_an_object, "export.quantization: Input should be a valid dictionary"),
    (float64_tensor, "graphs.0.outputs.0.dtype"),
    (string_count, "spec.schedule.stages.0.dominant: Input should be a valid integer"),
    (path_in_files, "graphs.0.file: String should match pattern"),
    (lambda data, copy: json.dumps([data]).encode(), "holds a JSON list, not an object"),
    (lambda data, copy: b"\x89PNG\x00\xff\xfe binary", "is not text"),
    (lambda data, copy: json.dumps({k: v for k, v in data.items() if k != "graphs"}).encode(), "graphs: Field required"),
]


@pytest.mark.parametrize("edit, fragment", TAMPERS, ids=[t[0].__name__ for t in TAMPERS])
def test_tampered_manifest_is_refused(artifacts, tmp_path, image, edit, fragment):
    copy = tampered(artifacts, tmp_path, edit)
    result = invoke("generate", "--artifacts", copy, "--image", image, "--prompt", "hi", "--max-new-tokens", "2")
    assert one_line_error(result, fragment), result.output


def test_artifacts_without_their_tokenizer_are_refused(artifacts, tmp_path, image):
    def drop_tokenizer(data, copy):  # consistently: file and entry gone
        (copy / "tokenizer.json").unlink()
        del data["files"]["tokenizer.json"]

    copy = tampered(artifacts, tmp_path, drop_tokenizer)
    result = invoke("generate", "--artifacts", copy, "--image", image, "--prompt", "hi")
    assert one_line_error(result, "has no usable tokenizer/image processor"), result.output


def test_loosened_gates_are_refused_by_validate(artifacts, tmp_path):
    """The gates come from the tool's table (visiondrop_edge/gates.py), never from the artifact."""
    def loosen(data, copy):
        data["tolerances"].update(relative=1e9, end_to_end="report")

    copy = tampered(artifacts, tmp_path, loosen)
    result = invoke("validate", "--artifacts", copy, "--batch", "1", "--max-new-tokens", "2")
    assert one_line_error(result, "validation gates differ from this tool's fp32 gates: relative 1000000000.0"), result.output
    assert "PASSED" not in result.output


def test_untampered_copy_still_loads(artifacts, tmp_path):
    """The tamper tests refuse because of the edit, not because a copy is refused."""
    copy = tampered(artifacts, tmp_path, lambda data, copy: None)
    assert read_manifest(copy).spec["schedule"]["stages"][0]["dominant"] == 42
    (copy / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError):  # what a library caller catches
        read_manifest(copy)


# ------------------------------------------------------------------ config checks before transformers
def checkpoint_with(tmp_path, edit):
    folder = tmp_path / "ckpt"
    shutil.copytree(builtin_dir("tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    edited = edit(config)
    (folder / "config.json").write_text(json.dumps(config if edited is None else edited))
    return folder


CONFIG_CASES = [
    (lambda c: [c], "holds a JSON list, not an object"),
    (lambda c: c.pop("text_config") and None, "config.json has no text_config object"),
    (lambda c: c.pop("vision_config") and None, "config.json has no vision_config object"),
    (lambda c: c.update(vision_feature_layer=0), "vision_feature_layer 0 is not a layer of the 3-layer vision tower"),
    (lambda c: c.update(vision_feature_layer=5), "use 1..3 or -3..-1"),
    (lambda c: c.update(vision_feature_layer=-99), "vision_feature_layer -99"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy 'full' is not supported"),
    (lambda c: c["vision_config"].update(image_size=224), "crops images to"),
    (lambda c: c["vision_config"].update(image_size=340), "not a whole number of 14-pixel patches"),
    (lambda c: c["vision_config"].update(num_hidden_layers="3"), "config.json's vision_config.num_hidden_layers must be an integer"),
    (lambda c: c.update(text_config="llama"), "config.json has no text_config object"),
]


@pytest.mark.parametrize("edit, fragment", CONFIG_CASES, ids=[f[1][:30] for f in CONFIG_CASES])
def test_bad_configs_are_refused_before_loading(tmp_path, image, edit, fragment):
    folder = checkpoint_with(tmp_path, edit)
    for budget in ("32", "full"):
        result = invoke("generate", "--model", folder, "--image", image, "--prompt", "hi", "--budget", budget)
        assert one_line_error(result, fragment), result.output
        assert "re-download" not in result.stderr


def test_sliding_window_limits_the_sequence(tmp_path, image):
    """A Mistral decoder is exact only within its window (our attention has none)."""
    folder = checkpoint_with(tmp_path, lambda c: c["text_config"].update(model_type="mistral", sliding_window=64))
    result = invoke("generate", "--model", folder, "--image", image, "--prompt", "hi", "--budget", "32")
    assert one_line_error(result, "more than the 64 of the decoder's sliding_window"), result.output
    result = invoke("export", "--model", folder, "--budget", "32", "--out", tmp_path / "out")
    assert one_line_error(result, "--max-seq-len 2048 exceeds the decoder's sliding_window"), result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ prompt length
def test_a_prompt_longer_than_the_positions_is_refused_before_any_work(image, artifacts):
    long_prompt = "a" * 5000  # the tiny tokenizer is byte-level: 5000 tokens, over 4096 positions
    result = invoke("generate", "--image", image, "--prompt", long_prompt, "--budget", "32")
    assert one_line_error(result, "more than the 4096 of the model's max_position_embeddings"), result.output
    assert "generating" not in result.stderr
    result = invoke("generate", "--artifacts", artifacts, "--image", image, "--prompt", "a" * 2000, "--max-new-tokens", "8")
    assert one_line_error(result, "more than the 2048 of the artifacts' --max-seq-len"), result.output
    result = invoke("inspect", "--image", image, "--prompt", long_prompt, "--budget", "32", "--json", "-")
    assert one_line_error(result, "more than the 4096 of the model's max_position_embeddings; shorten the prompt"), result.output


# ------------------------------------------------------------------ images as Hugging Face reads them
def test_exif_orientation_is_applied_like_hf_load_image(tmp_path):
    from transformers.image_utils import load_image

    pixels = (np.random.default_rng(1).random((40, 70, 3)) * 255).astype("uint8")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    ours = np.asarray(load_images([path])[0])
    reference = np.asarray(load_image(str(path)).convert("RGB"))
    assert ours.shape == (70, 40, 3) and np.array_equal(ours, reference)


def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    rgb = np.asarray(load_images([path])[0])
    expected = np.round(ramp / 257.0)  # 65535 -> 255, linear: the 8-bit value of each 16-bit one
    assert rgb.shape == (64, 64, 3) and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") made 99.6% of this ramp white


def test_decompression_bombs_and_folders_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    for limit in (4_000, 6_000):  # PIL errors above 2x its limit and only warns between 1x and 2x
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        result = invoke("generate", "--image", path, "--prompt", "hi")
        assert one_line_error(result, f"the limit is {limit:,} pixels"), result.output
    result = invoke("generate", "--image", tmp_path, "--prompt", "hi")
    assert one_line_error(result, "is a folder, not an image file"), result.output


# ------------------------------------------------------------------ output paths, before the model loads
def test_unwritable_outputs_are_refused_before_the_model_loads(tmp_path, image, artifacts):
    afile = tmp_path / "afile"
    afile.write_text("x")
    below = afile / "out.json"
    cases = [
        (["generate", "--image", image, "--prompt", "hi", "--trace", below], "--trace"),
        (["bench", "--model", "tiny", "--json", below], "--json"),
        (["bench", "--model", "tiny", "--plot", below], "--plot"),
        (["inspect", "--image", image, "--budget", "32", "--out", below], "--out"),
        (["validate", "--artifacts", artifacts, "--json", below], "--json"),
        (["export", "--budget", "full", "--out", afile / "art"], "is a file, not a folder"),
    ]
    for args, fragment in cases:
        result = invoke(*args)
        assert one_line_error(result, fragment), (args, result.output)
        assert "loading" not in result.stderr, args
    assert afile.read_text() == "x"
    assert usage_error(invoke("generate", "--image", image, "--prompt", "hi", "--trace", tmp_path), "--trace")


def test_a_read_only_folder_is_refused_before_the_model_loads(tmp_path, image, monkeypatch):
    """(This machine runs the tests as root, for whom chmod does not stop writes: the probe's
    failure is simulated the way a read-only or foreign folder makes it fail.)"""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = invoke("generate", "--image", image, "--prompt", "hi", "--trace", tmp_path / "t.json")
    assert one_line_error(result, f"{tmp_path} is not writable (Permission denied)"), result.output
    assert "loading" not in result.stderr


def test_answers_are_printed_even_if_the_trace_cannot_be_written(image, tmp_path, monkeypatch):
    import visiondrop_edge.trace

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(visiondrop_edge.trace, "write_json", disk_full)
    result = invoke("generate", "--image", image, "--prompt", "hi", "--budget", "32", "--max-new-tokens", "3",
                    "--json", "-", "--trace", tmp_path / "t.json")
    assert one_line_error(result, "could not write"), result.output
    assert len(json.loads(result.stdout)["generated_ids"][0]) >= 1


def test_bad_model_cache_settings(tmp_path, image, monkeypatch):
    monkeypatch.setenv("VISIONDROP_CACHE", "")
    assert one_line_error(invoke("generate", "--image", image, "--prompt", "hi"), "VISIONDROP_CACHE is set but empty")
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("VISIONDROP_CACHE", str(afile / "cache"))
    result = invoke("generate", "--image", image, "--prompt", "hi")
    assert one_line_error(result, "set VISIONDROP_CACHE to a writable folder"), result.output


# ------------------------------------------------------------------ the built-in cache is verified
def test_an_altered_cache_is_rebuilt_saying_so(tmp_path, monkeypatch, caplog, tiny):
    monkeypatch.setenv("VISIONDROP_CACHE", str(tmp_path))
    cache = builtin_dir("tiny")
    fresh = snapshot(cache)
    weights = cache / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0x01  # a weight's low bit: still loadable, silently different
    weights.write_bytes(bytes(blob))
    with caplog.at_level("WARNING", logger="visiondrop"):
        loaded = load_model("tiny")
    assert "has a changed model.safetensors: rebuilding it" in caplog.text
    assert snapshot(cache) == fresh and loaded.content_hash == tiny.content_hash
    (cache / "visiondrop-builtin.json").unlink()  # a cache written before the marker existed
    caplog.clear()
    with caplog.at_level("WARNING", logger="visiondrop"):
        builtin_dir("tiny")
    assert "has no readable visiondrop-builtin.json: rebuilding it" in caplog.text and snapshot(cache) == fresh


def test_first_use_waits_for_a_concurrent_cache_build(tmp_path, monkeypatch):
    """Two commands on a fresh machine: the second waits for the first's cache, no error."""
    import threading

    from visiondrop_edge import loading

    ready = builtin_dir("tiny")  # the session's cache, built by this code
    monkeypatch.setenv("VISIONDROP_CACHE", str(tmp_path))
    cache = tmp_path / ready.name
    real_lock, waiting, holding = loading._exclusive_lock, threading.Event(), threading.Event()

    def spy(target, wait=False):
        if wait:
            waiting.set()
        return real_lock(target, wait)

    def first_writer():  # holds the cache's lock until the second one waits, then "finishes"
        with real_lock(cache):
            holding.set()
            waiting.wait(60)
            shutil.copytree(ready, cache)

    monkeypatch.setattr(loading, "_exclusive_lock", spy)
    writer = threading.Thread(target=first_writer)
    writer.start()
    holding.wait(60)
    try:
        assert builtin_dir("tiny") == cache
    finally:
        waiting.set()
        writer.join(60)
    assert waiting.is_set() and snapshot(cache) == snapshot(ready) and leftovers(tmp_path) == []


# ------------------------------------------------------------------ option values
def test_bad_option_values_are_refused(image):
    for device in ("bogus", "meta", "cuda:x"):
        result = invoke("generate", "--image", image, "--prompt", "hi", "--device", device)
        assert usage_error(result, "--device") and "is not a device" in result.stderr, result.output
    for opset in ("16", "99"):
        assert usage_error(invoke("export", "--budget", "full", "--opset", opset), "--opset")
    assert one_line_error(invoke("bench", "--budgets", ""), "--budgets takes budgets")
    assert one_line_error(invoke("bench", "--budgets", " , "), "--budgets takes budgets")


def test_the_opset_range_is_what_the_exporter_writes():
    import onnx
    from torch.onnx import _constants

    assert cli.MAX_OPSET == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    assert cli.MAX_OPSET <= onnx.defs.onnx_opset_version()

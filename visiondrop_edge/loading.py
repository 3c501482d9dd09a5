"""Load a LLaVA checkpoint (a local Hugging Face directory or a built-in preset) with checks.

Real checkpoints and the built-in ``tiny`` model go through the same ``from_pretrained``
path; every failure a user can cause becomes a :class:`UserError` that says what to do.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoProcessor, PreTrainedConfig

from .builtin import BUILTIN_FORMAT, BUILTIN_MARKER, BUILTIN_VERSION, PRESETS, build_model, recipe_hash
from .errors import CheckpointError, ConcurrentWriteError, OutputError, UserError
from .families import Family, PromptTemplate, family_for_config, family_of
from .schedule import REFERENCE_GRID, CropGrid, Schedule, resolve_schedule
from .jsonio import read_json_object

LOG = logging.getLogger("visiondrop")

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Presets that live on disk like a downloaded checkpoint; the larger ones are built in memory.
SAVED_PRESETS = ("tiny", "tiny-next")


@dataclass
class LoadedModel:
    """A model ready for VisionDrop, with the processor that prepares its inputs."""

    model: nn.Module  # the family's HF model class, e.g. LlavaForConditionalGeneration
    processor: object  # LlavaProcessor: .tokenizer and .image_processor
    source: str  # preset name, or the checkpoint directory's absolute path
    hasher: Callable[[], str] = field(repr=False)
    template: PromptTemplate  # the prompt recipe: template, tokenisation, image framing (the family's)
    directory: Path | None = None  # the checkpoint folder read (None for in-memory presets)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over config + weights: what a manifest pins (computed on first use)."""
        return self.hasher()

    @cached_property
    def family(self) -> type[Family]:
        return family_of(self.model)

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_positions(self) -> tuple[int, str]:
        """(longest sequence this pipeline computes exactly, what sets it): the family's rule."""
        return self.family.max_positions(self.config)

    @property
    def crop_layout(self) -> dict | None:
        """How the family cuts images into views (None: one view per image)."""
        return self.family.crop_layout(self.config)

    def crop_grid(self, image_size: tuple[int, int]) -> CropGrid | None:
        """The views of an image of ``image_size`` (height, width): None for a one-view family."""
        return self.family.crop_grid(self.crop_layout, image_size)

    def schedule(self, budget: str | int | None = None, schedule: str | None = None, grid: CropGrid | None = None,
                 scope: str = "block") -> Schedule:
        """The schedule ``--budget``/``--schedule`` ask for, sized to this model; for a multi-crop
        family on one image ``grid`` (:meth:`crop_grid`; default: the 2x2 grid the budget is
        defined on, filled by the image; ``Schedule.for_grid`` re-grids it per image). ``scope``: see SCOPES."""
        geometry = self.family.geometry(self.config)
        if grid is None and self.crop_layout is not None:
            grid = REFERENCE_GRID.filled(geometry.grid)
        return resolve_schedule(budget, schedule, self.config.text_config.num_hidden_layers, geometry.num_patches,
                                cls_tokens=geometry.cls_tokens, grid=grid, scope=scope)


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def parameter_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def apply_precision(loaded: LoadedModel, vision_dtype: str | None) -> LoadedModel:
    """The precision policy: the CLIP tower (and with it the stage-0 prune) in ``vision_dtype``,
    the projector and decoder as loaded. The reference's fp16 evaluation keeps CLIP in fp32."""
    if vision_dtype is not None:
        loaded.family.tower_parameters(loaded.model).to(EXPORT_DTYPES[vision_dtype])
    return loaded


def cache_root() -> Path:
    """Where saved presets live: ``$VISIONDROP_CACHE``, else ``~/.cache/visiondrop``."""
    value = os.environ.get("VISIONDROP_CACHE")
    if value is None:
        return Path.home() / ".cache" / "visiondrop"
    if not value.strip():
        raise OutputError("VISIONDROP_CACHE is set but empty: unset it (default ~/.cache/visiondrop) or set it to a folder")
    return Path(value).expanduser()


# ------------------------------------------------------------------ safe folder writes
# Every folder this tool writes (artifacts, checkpoints, the preset cache) is built in a
# staging folder beside the target, ``.<name>.visiondrop-staging-<pid>``, and renamed into
# place; a folder it replaces is first renamed aside to ``.<name>.visiondrop-replaced-<pid>``.
# A lock file ``.<name>.visiondrop-lock`` serialises writers of one target.
OWNED_FORMATS = "visiondrop-edge/"  # the "format" prefix of our manifests
OWNER_FILES = ("manifest.json", BUILTIN_MARKER)
STAGING, REPLACED, LOCK = "visiondrop-staging", "visiondrop-replaced", "visiondrop-lock"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def written_by_us(folder: Path) -> bool:
    """True if ``folder`` holds one of our manifests (an artifact folder or a saved preset)."""
    for name in OWNER_FILES:
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("format", "")).startswith(OWNED_FORMATS):
            return True
    return False


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """Refuse an output path (a file, or with ``folder`` a folder) that cannot be written,
    before any work is done.

    Missing parent folders are fine (they are created); a parent that is a file, or a
    folder where a file cannot be created, is not.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise OutputError(f"{what} {path} is a folder: give a file path")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link
            raise OutputError(f"cannot write {what} {path}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {what} {path}: {ancestor} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".visiondrop-probe-", dir=ancestor)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {ancestor} is not writable ({exc.strerror}); choose another path") from None
    os.close(fd)
    os.unlink(probe)


def check_target(target: Path, force: bool, protect: Sequence[Path] = (), owned: bool = False) -> Path:
    """Refuse a target folder whose replacement could destroy data this tool did not write.

    ``protect`` are folders that must survive (the model being read); ``owned`` marks a
    path this tool names itself (a cache entry). Returns the absolute target.
    """
    target = Path(target).expanduser()
    if target.is_symlink():
        raise OutputError(f"{target} is a symbolic link: give the real folder's path, or another one")
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{target} is the current folder or contains it: write to a new folder, e.g. artifacts/NAME")
    for keep in protect:
        keep = Path(keep).resolve()
        if resolved == keep or resolved in keep.parents:
            raise OutputError(f"{target} would replace {keep}, which the model is read from: choose another output folder")
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{target} is a file, not a folder: choose another output folder")
    check_writable(resolved, "folder", folder=True)
    if resolved.is_dir() and any(resolved.iterdir()):
        if not force:
            raise OutputError.naming("{target} exists and is not empty: pass {force} to replace it, or choose another output folder",
                                     target=target)
        if not owned and not written_by_us(resolved):
            raise OutputError.naming(
                "{target} was not written by visiondrop (no visiondrop manifest in it): {force} only replaces "
                "folders this tool wrote; move it away yourself or choose another output folder", target=target,
            )
    return resolved


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@contextmanager
def _exclusive_lock(target: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``.<name>.visiondrop-lock`` beside ``target`` (flock); a second writer gets a
    :class:`ConcurrentWriteError`, or with ``wait`` blocks until the first one is done."""
    path = target.parent / f".{target.name}.{LOCK}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConcurrentWriteError(
                f"{target} is being written by another visiondrop process (pid {holder}): wait for it to finish, "
                "or choose another output folder"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a lock file its holder had just removed: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _clean_leftovers(target: Path) -> None:
    """Remove staging/replaced folders of ``target`` whose writer died (kill -9, power loss).

    A replaced folder whose target is missing (a crash between the two renames) is put back.
    Called with the target's lock held.
    """
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.visiondrop-*-*")):
        kind, _, pid = path.name[len(target.name) + 2:].rpartition("-")
        if kind not in (STAGING, REPLACED) or not pid.isdigit() or not path.is_dir():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if kind == REPLACED and not target.exists():
            path.rename(target)
            LOG.warning(f"note: restored {target} from {path.name}, left by an interrupted write (pid {pid})")
        else:
            shutil.rmtree(path)
            LOG.warning(f"note: removed {path}, left by an interrupted write (pid {pid})")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _plain_permissions(folder: Path) -> None:
    """Give every file what a plain ``open`` would (some writers, e.g. safetensors, use 0600)."""
    mask = current_umask()
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_atomically(
    target: Path, fill: Callable[[Path, Path], None], force: bool = False, protect: Sequence[Path] = (), owned: bool = False,
) -> Path:
    """Run ``fill(folder, scratch)`` in a staging folder beside ``target``, then swap it in.

    Never a half-written folder and never lost data: a non-empty ``target`` is replaced
    only with ``force`` and only if this tool wrote it (see :func:`check_target`); it is
    renamed aside, the new folder renamed in, and only then the old one deleted. ``scratch``
    is for intermediate files and is deleted with the staging folder.
    """
    target = check_target(target, force, protect, owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target):
        _clean_leftovers(target)  # may put back a folder a crash left renamed aside
        check_target(target, force, protect, owned)  # again: the last writer may have just finished
        staging = target.parent / f".{target.name}.{STAGING}-{os.getpid()}"
        try:
            (staging / "scratch").mkdir(parents=True)
            (staging / "folder").mkdir()
            fill(staging / "folder", staging / "scratch")
            _plain_permissions(staging / "folder")
            if target.exists():
                aside = target.parent / f".{target.name}.{REPLACED}-{os.getpid()}"
                target.rename(aside)
                try:
                    (staging / "folder").rename(target)
                except BaseException:
                    aside.rename(target)
                    raise
                shutil.rmtree(aside)
            else:
                (staging / "folder").rename(target)
        except OSError as exc:  # disk full, quota, I/O error: one line, and the target as it was
            reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))
            raise OutputError(f"writing {target} failed ({reason}); {target} was left as it was") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------ built-in presets
def save_builtin(name: str, out: Path, force: bool = False, owned: bool = False) -> Path:
    """Write a built-in preset as a Hugging Face checkpoint directory, with its file hashes."""
    check_target(out, force, owned=owned)  # before building anything
    model, processor = build_model(name)

    def fill(folder: Path, scratch: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        marker = {"format": BUILTIN_FORMAT, "preset": name, "recipe": recipe_hash(name), "files": files}
        (folder / BUILTIN_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    return write_atomically(out, fill, force=force, owned=owned)


def builtin_mismatch(path: Path, name: str) -> str | None:
    """Why the saved preset in ``path`` cannot be trusted, or None if every file matches its hash."""
    try:
        marker = json.loads((path / BUILTIN_MARKER).read_text())
    except (OSError, ValueError):
        return f"has no readable {BUILTIN_MARKER}"
    if not isinstance(marker, dict) or marker.get("recipe") != recipe_hash(name) or not isinstance(marker.get("files"), dict):
        return f"was built from another version of the '{name}' preset"
    present = {p.name for p in path.iterdir() if p.is_file() and p.name != BUILTIN_MARKER}
    if present != set(marker["files"]):
        return f"has other files than it was written with ({', '.join(sorted(present ^ set(marker['files'])))})"
    for file, expected in marker["files"].items():
        if sha256_file(path / file) != expected:
            return f"has a changed {file}"
    return None


def builtin_dir(name: str) -> Path:
    """The cached checkpoint directory of a saved preset: written on first use, verified on
    every use and rebuilt (saying so) when a file no longer matches."""
    root = cache_root()
    path = root / f"{name}-v{BUILTIN_VERSION}"
    if path.is_dir():
        problem = builtin_mismatch(path, name)
        if problem is None:
            return path
        LOG.warning(f"note: the cached '{name}' model in {path} {problem}: rebuilding it")
    try:
        check_writable(path, "folder", folder=True)
    except UserError as exc:
        raise OutputError(f"{exc} (the built-in model cache; set VISIONDROP_CACHE to a writable folder)") from None
    try:
        return save_builtin(name, path, force=True, owned=True)
    except ConcurrentWriteError:  # another process is writing the cache: use what it writes
        with _exclusive_lock(path, wait=True):
            problem = builtin_mismatch(path, name) if path.is_dir() else "is missing"
        if problem is None:
            return path
        return save_builtin(name, path, force=True, owned=True)


# ------------------------------------------------------------------ config checks
def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(
            f"model '{path}' is neither a built-in preset ({', '.join(PRESETS)}) nor a directory: pass a "
            "local Hugging Face LLaVA checkpoint folder (e.g. one made by "
            "`huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir DIR`)"
        )
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: pass the folder that save_pretrained or huggingface-cli download wrote")
    return read_json_object(config_file, CheckpointError, "it must be the JSON object that save_pretrained writes")


def check_supported(config: dict, where: str) -> type[Family]:
    """The family that handles ``config.json``, after its refusals (one line naming the field
    and the valid values). Runs on the JSON, before transformers instantiates anything
    (transformers fills a missing sub-config with a 7B Llama default, for one)."""
    return family_for_config(config, where)


def processor_files(path: Path) -> dict[str, dict]:
    """The saved image-processor settings as JSON (``preprocessor_config.json``, or the
    ``image_processor`` entry of ``processor_config.json``), for the family's checks before loading."""
    found = {}
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue  # AutoProcessor reports a missing or unreadable processor
        data = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(data, dict):
            found[name] = data
    return found


def content_hash(path: Path) -> str:
    """sha256 over config.json and the weight files (name + bytes), in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over an in-memory model's tensors, for presets that are never written to disk."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_processor(path: Path, error: type[UserError], advice: str):
    """The tokenizer + image processor saved in ``path``; any failure is one ``error`` with ``advice``."""
    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError for missing or broken files
        raise error(f"{path} has no usable tokenizer/image processor ({_first_line(exc)}): {advice}") from None


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               conversation: str | None = None) -> LoadedModel:
    """Load ``spec`` (a preset name or a checkpoint directory) for inference, prompted with the
    family's ``conversation`` (None: its default for this checkpoint; checked here)."""
    if spec in PRESETS and spec not in SAVED_PRESETS:
        model, processor = build_model(spec, device=device)
        model = model.to(dtype)
        template = family_of(model).conversation(processor, conversation)
        return LoadedModel(model, processor, spec, lambda: state_dict_hash(model), template)
    path = builtin_dir(spec) if spec in PRESETS else Path(spec).expanduser().resolve()
    config = _read_config(path)
    family = check_supported(config, str(path))
    family.check_processor(processor_files(path), config, str(path))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise CheckpointError(f"{path} has no weight files (*.safetensors or *.bin): the download is incomplete")
    try:
        model, info = family.model_class.from_pretrained(
            path, dtype=dtype, output_loading_info=True, attn_implementation="sdpa"
        )
    except Exception as exc:  # any parse/IO failure from transformers or safetensors
        raise CheckpointError(
            f"could not load the weights in {path} ({_first_line(exc)}): they are damaged or do not fit config.json"
        ) from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"{path} lacks {len(missing)} weights (first: {missing[0]}): the checkpoint is incomplete")
    processor = load_processor(path, CheckpointError, "copy the processor files next to the weights")
    model = model.to(device).eval()
    source = spec if spec in PRESETS else str(path)
    template = family.conversation(processor, conversation)
    return LoadedModel(model, processor, source, lambda: content_hash(path), template, directory=path)

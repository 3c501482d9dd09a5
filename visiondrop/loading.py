"""Load a LLaVA checkpoint (a local Hugging Face directory or a built-in preset) with checks.

Real checkpoints and the built-in ``tiny`` model go through the same ``from_pretrained``
path; every failure a user can cause becomes a :class:`UserError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, PreTrainedConfig

from .builtin import BUILTIN_VERSION, PRESETS, build_model
from .errors import UserError
from .schedule import Schedule, resolve_schedule

SUPPORTED_DECODERS = ("llama", "mistral")
SUPPORTED_VISION = ("clip_vision_model",)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Presets that live on disk like a downloaded checkpoint; the larger ones are built in memory.
SAVED_PRESETS = ("tiny",)


@dataclass
class LoadedModel:
    """A model ready for VisionDrop, with the processor that prepares its inputs."""

    model: LlavaForConditionalGeneration
    processor: object  # LlavaProcessor: .tokenizer and .image_processor
    source: str  # preset name, or the checkpoint directory's absolute path
    hasher: Callable[[], str] = field(repr=False)

    @cached_property
    def content_hash(self) -> str:
        """sha256 over config + weights: what a manifest pins (computed on first use)."""
        return self.hasher()

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def schedule(self, budget: str | int | None = None, schedule: str | None = None) -> Schedule:
        """The schedule ``--budget``/``--schedule`` ask for, sized to this model."""
        vision = self.config.vision_config
        num_patches = (vision.image_size // vision.patch_size) ** 2
        return resolve_schedule(budget, schedule, self.config.text_config.num_hidden_layers, num_patches)


def cache_root() -> Path:
    return Path(os.environ.get("VISIONDROP_CACHE", Path.home() / ".cache" / "visiondrop"))


def write_atomically(target: Path, fill, force: bool = False) -> Path:
    """Run ``fill(tmp_dir)`` and rename the result to ``target``: never a half-written folder.

    A non-empty ``target`` is refused unless ``force`` (then it is replaced whole).
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise UserError(f"{target} exists and is not empty: pass --force to replace it, or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_builtin(name: str, out: Path, force: bool = False) -> Path:
    """Write a built-in preset as a Hugging Face checkpoint directory."""
    model, processor = build_model(name)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return write_atomically(out, fill, force=force)


def builtin_dir(name: str) -> Path:
    """The cached checkpoint directory of a saved preset, written on first use."""
    path = cache_root() / f"{name}-v{BUILTIN_VERSION}"
    if not (path / "config.json").exists():
        save_builtin(name, path, force=True)
    return path


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise UserError(
            f"model '{path}' is neither a built-in preset ({', '.join(PRESETS)}) nor a directory: pass a "
            "local Hugging Face LLaVA checkpoint folder (e.g. one made by "
            "`huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir DIR`)"
        )
    if not config_file.exists():
        raise UserError(f"{path} has no config.json: pass the folder that save_pretrained or huggingface-cli download wrote")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}): re-download the checkpoint") from None


def check_supported(config: dict, where: str) -> None:
    """Refuse configs VisionDrop's graphs do not cover, naming what would be needed."""
    model_type = config.get("model_type")
    if model_type != "llava":
        raise UserError(
            f"{where} is a '{model_type}' checkpoint, not LLaVA (model_type 'llava'): VisionDrop Edge "
            "runs LlavaForConditionalGeneration checkpoints such as llava-hf/llava-1.5-7b-hf"
        )
    text_type = (config.get("text_config") or {}).get("model_type", "llama")
    if text_type not in SUPPORTED_DECODERS:
        raise UserError(f"{where}: decoder type '{text_type}' is not supported (supported: {', '.join(SUPPORTED_DECODERS)})")
    if (config.get("text_config") or {}).get("attention_bias", False):
        raise UserError(f"{where}: q/k/v projections with biases are not supported (attention_bias is true)")
    vision_type = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if vision_type not in SUPPORTED_VISION:
        raise UserError(f"{where}: vision tower '{vision_type}' is not supported (supported: CLIP)")
    if not isinstance(config.get("vision_feature_layer", -2), int):
        raise UserError(f"{where}: a list of vision_feature_layer values is not supported; use a single layer")


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


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load ``spec`` (a preset name or a checkpoint directory) for inference."""
    if spec in PRESETS and spec not in SAVED_PRESETS:
        model, processor = build_model(spec, device=device)
        model = model.to(dtype)
        return LoadedModel(model, processor, spec, lambda: state_dict_hash(model))
    path = builtin_dir(spec) if spec in PRESETS else Path(spec).expanduser().resolve()
    check_supported(_read_config(path), str(path))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise UserError(f"{path} has no weight files (*.safetensors or *.bin): the download is incomplete")
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, output_loading_info=True, attn_implementation="sdpa"
        )
    except Exception as exc:  # any parse/IO failure from transformers or safetensors
        raise UserError(f"could not load the weights in {path} ({_first_line(exc)}): re-download the checkpoint") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"{path} lacks {len(missing)} weights (first: {missing[0]}): the checkpoint is incomplete")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{path} has no usable tokenizer/image processor ({_first_line(exc)}): copy the processor files next to the weights") from None
    model = model.to(device).eval()
    source = spec if spec in PRESETS else str(path)
    return LoadedModel(model, processor, source, lambda: content_hash(path))

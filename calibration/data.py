"""Calibration data: the images and prompts, and the inputs each graph sees when the pipeline runs.

Every graph is calibrated on its real inputs. The float artifacts run the pipeline end to end
(prefill and a few decode steps) under ``export.validate.RecordingBackend``. So the vision
encoder sees processed pixels, the qkv and decoder groups see the sequences of their own
stage (pruned ones after an LLM prune), and the decoders see prefill and decode steps with
their caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from visiondrop_edge.errors import SettingError, UserError
from visiondrop_edge.prompt import build_prompts, load_images, pixel_values, random_images

PROMPTS_FILE = "prompts.jsonl"
BUILTIN = "builtin"
BUILTIN_SEED = 20261201  # fixed: the built-in set, and so its hash, never change
BUILTIN_PROMPTS = (
    "What is in this image?",
    "Describe the scene in one long and detailed sentence, please.",
    "How many objects can you count?",
    "What colours dominate the picture, and where?",
    "Is there anything unusual here?",
    "Write a short caption.",
    "What is in the top left corner?",
    "Describe the textures you see, from the brightest region to the darkest one.",
)


@dataclass(frozen=True)
class CalibrationSet:
    """The (image, prompt) samples, and what the manifest records about them."""

    source: str  # "builtin" or the --data folder
    images: list[Image.Image]
    prompts: list[str]

    @property
    def samples(self) -> int:
        return len(self.images)

    @property
    def sha256(self) -> str:
        """Hash of the decoded RGB pixels and prompt text, sample by sample (independent of file encoding)."""
        digest = hashlib.sha256()
        for image, prompt in zip(self.images, self.prompts):
            digest.update(f"{image.width}x{image.height}\n".encode())
            digest.update(image.tobytes())
            digest.update(prompt.encode() + b"\n")
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "samples": self.samples}


def builtin_set(samples: int) -> CalibrationSet:
    """Seeded synthetic images (``random_images``) with the fixed prompts, cycled."""
    prompts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in range(samples)]
    return CalibrationSet(BUILTIN, random_images(samples, seed=BUILTIN_SEED), prompts)


def folder_set(directory: Path, samples: int | None) -> CalibrationSet:
    """``DIR/prompts.jsonl``: one ``{"image": "file.png", "prompt": "..."}`` per line, images relative to DIR."""
    file = directory / PROMPTS_FILE
    if not file.is_file():
        raise UserError(
            f"{directory} has no {PROMPTS_FILE}: write one line per sample, "
            '{"image": "cat.png", "prompt": "What is this?"}, next to the images (or use --data builtin)'
        )
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((directory / str(row["image"]), str(row["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f'{file} line {number} is not {{"image": ..., "prompt": ...}}: fix or remove it') from None
    if not rows:
        raise UserError(f"{file} lists no samples: add lines of {{\"image\": ..., \"prompt\": ...}}")
    if samples is not None and samples > len(rows):
        raise SettingError(f"{{samples}} {samples} but {file} lists only {len(rows)}: lower {{samples}} or add samples")
    rows = rows[:samples] if samples is not None else rows
    return CalibrationSet(str(directory.resolve()), load_images([path for path, _ in rows]), [prompt for _, prompt in rows])


def calibration_set(data: str, samples: int | None, default_builtin_samples: int) -> CalibrationSet:
    if data == BUILTIN:
        return builtin_set(samples or default_builtin_samples)
    directory = Path(data)
    if not directory.is_dir():
        raise SettingError(f"{{data}} {data} is not a folder: pass a folder of images with {PROMPTS_FILE}, or 'builtin'")
    return folder_set(directory, samples)


GraphFeeds = dict[str, list[dict[str, np.ndarray]]]  # graph name -> one feed per recorded call


def record_feeds(
    backend, processor, data: CalibrationSet, batch_size: int, new_tokens: int,
    progress: Callable[[str], None] = lambda message: None,
) -> GraphFeeds:
    """Run the pipeline on ``backend`` over ``data`` and keep every graph's inputs, by graph name.

    Feeds are cast to the dtypes of the manifest's I/O contract (pixels arrive as fp32).
    """
    from visiondrop_edge.runtime.validate import RecordingBackend
    from visiondrop_edge.runtime.generate import greedy_generate

    manifest = backend.manifest
    spec = backend.spec
    feeds: GraphFeeds = {entry.name: [] for entry in manifest.graphs}
    for start in range(0, data.samples, batch_size):
        stop = min(start + batch_size, data.samples)
        progress(f"calibration run: samples {start + 1}-{stop} of {data.samples} ...")
        pixels = pixel_values(processor.image_processor, data.images[start:stop], spec.prompt_template)
        prompts = build_prompts(processor.tokenizer, spec.prompt_template, data.prompts[start:stop], spec.schedule.image_tokens,
                                spec.image_token_id, spec.pad_token_id)
        recorder = RecordingBackend(backend)
        greedy_generate(recorder, pixels, prompts, new_tokens)
        for _, role, index, inputs, _ in recorder.calls:
            entry = manifest.graph(role, index)
            feeds[entry.name].append({
                contract["name"]: _as_contract(tensor, contract["dtype"]) for contract, tensor in zip(entry.inputs, inputs)
            })
    return feeds


def _as_contract(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(dtype, copy=False))

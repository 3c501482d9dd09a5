"""``inspect``: which parts of an image survive each VisionDrop stage.

Every token a stage sees descends from original patches: a dominant token is one earlier
token, a contextual token folds a target and its members. Each token therefore has one
*representative* patch (its own, or its target's, recursively; CLS has none) and a
*coverage* (every patch merged into it). A panel per stage shows the dominant tokens'
representatives highlighted (patches merged into them earlier lightly lit) and each
contextual group's coverage coloured by its target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import pruning
from .prompt import build_prompts, pixel_values
from .schedule import Schedule

CLS = "cls"


@dataclass
class Panel:
    name: str
    dominant: list  # representative patch per dominant token (CLS = "cls")
    dominant_coverage: list[list[int]]  # the patches each dominant token covers (several if it was merged earlier)
    contextual: list[dict]  # per contextual token: its target's representative and the patches it covers


def keep_map(schedule: Schedule, traces: list) -> list[Panel]:
    """Panels for sample 0 from the stages' StageTraces (vision stage first)."""
    num_patches = schedule.num_patches
    cls = [CLS] * schedule.cls_tokens
    representative: list = cls + list(range(num_patches))  # the vision stage's input: CLS (if any), patches
    coverage: list[set[int]] = [set() for _ in cls] + [{p} for p in range(num_patches)]
    panels = []
    for stage, result in zip(schedule.stages, traces):
        kept = result.kept_index[0].tolist()
        targets = result.target_index[0].tolist()
        rest = sorted(set(range(len(representative))) - set(kept))
        slots = pruning.slots_of(result.assignment[:1], len(rest), len(targets))[0].tolist()
        groups = []
        for slot, target in enumerate(targets):
            covered = set(coverage[target])
            for token, token_slot in zip(rest, slots):
                if token_slot == slot:
                    covered |= coverage[token]
            groups.append({"target": representative[target], "patches": sorted(covered)})
        name = "vision" if stage.is_vision else f"after layer {stage.after_layer}"
        panels.append(Panel(f"{name}: {stage.dominant}+{stage.contextual}", [representative[i] for i in kept],
                            [sorted(coverage[i]) for i in kept], groups))
        representative = [representative[i] for i in kept] + [representative[t] for t in targets]
        coverage = [coverage[i] for i in kept] + [set(g["patches"]) for g in groups]
    return panels


@torch.no_grad()
def inspect_image(loaded, schedule: Schedule, image, prompt: str) -> tuple[list[Panel], np.ndarray]:
    """Run one prefill with traces on; returns the panels and the image as the model saw it."""
    from visiondrop_edge.prompt import pad_token_id
    from visiondrop_edge.runtime.torch_backend import TorchBackend

    backend = TorchBackend(loaded, schedule)
    pixels = pixel_values(loaded.processor.image_processor, [image], loaded.template)
    batch = build_prompts(loaded.tokenizer, loaded.template, [prompt], schedule.image_tokens, loaded.config.image_token_id, pad_token_id(loaded.tokenizer))
    vision = backend.encode_image(pixels)
    prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    traces = [vision.stage, *prefill.stages]
    processor = loaded.processor.image_processor
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    seen = pixels[0].permute(1, 2, 0).float().numpy() * std + mean
    return keep_map(schedule, traces), (np.clip(seen, 0, 1) * 255).astype(np.uint8)


def draw(panels: list[Panel], image: np.ndarray, patch_size: int, path: str | Path) -> None:
    """One panel per stage: dominant patches bright and outlined, contextual groups coloured by target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = image.shape[1] // patch_size
    colours = plt.get_cmap("tab20")
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        shade = np.full(image.shape[:2] + (1,), 0.25)
        overlay = np.zeros(image.shape, dtype=float)
        for group_index, group in enumerate(panel.contextual):
            colour = np.array(colours(group_index % 20)[:3])
            for patch in group["patches"]:
                row, col = divmod(patch, grid)
                area = np.s_[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
                overlay[area] = colour
                shade[area] = 0.55
        for covered in panel.dominant_coverage:  # patches merged earlier into a now-dominant token
            for patch in covered:
                row, col = divmod(patch, grid)
                shade[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size] = 0.75
        for patch in panel.dominant:
            if patch != CLS:
                row, col = divmod(patch, grid)
                area = np.s_[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
                shade[area], overlay[area] = 1.0, 0.0
        blend = np.where(overlay.any(-1, keepdims=True), 0.5 * image / 255 + 0.5 * overlay, shade * image / 255)
        axis.imshow(np.clip(blend, 0, 1))
        for patch in panel.dominant:
            if patch != CLS:
                row, col = divmod(patch, grid)
                axis.add_patch(Rectangle((col * patch_size, row * patch_size), patch_size, patch_size,
                                         fill=False, edgecolor="white", linewidth=0.6))
        for group_index, group in enumerate(panel.contextual):
            if group["target"] != CLS:
                row, col = divmod(group["target"], grid)
                axis.add_patch(Rectangle((col * patch_size, row * patch_size), patch_size, patch_size,
                                         fill=False, edgecolor=colours(group_index % 20), linewidth=2.0))
        patches = sum(p != CLS for p in panel.dominant)
        cls_note = " + CLS" if CLS in panel.dominant else ""
        axis.set_title(f"{panel.name}\n{patches} dominant patches{cls_note}, {len(panel.contextual)} groups", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def panels_json(panels: list[Panel]) -> list[dict]:
    return [asdict(p) for p in panels]

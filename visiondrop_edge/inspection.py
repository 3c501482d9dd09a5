"""``inspect``: which parts of an image survive each VisionDrop stage.

Every token a stage sees descends from original patches: a dominant token is one earlier
token, a contextual token folds a target and its members. Each token therefore has one
*representative* patch (its own, or its target's, recursively; CLS has none) and a
*coverage* (every patch merged into it). A panel per stage shows the dominant tokens'
representatives highlighted (patches merged into them earlier lightly lit) and each
contextual group's coverage coloured by its target.

Patches are numbered over the vision unit's *canvases*: one image for LLaVA-1.5; for a
multi-crop image its base view, then the crops stitched into the padded image, so the crops'
kept patches are drawn where they are in the picture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import pruning
from .prompt import build_prompts, image_sizes, pixel_values
from .schedule import Schedule

CLS = "cls"


@dataclass
class Panel:
    name: str
    dominant: list  # representative patch per dominant token (CLS = "cls")
    dominant_coverage: list[list[int]]  # the patches each dominant token covers (several if it was merged earlier)
    contextual: list[dict]  # per contextual token: its target's representative and the patches it covers


@dataclass
class Canvas:
    """An image the patches are drawn on: patches ``first_patch`` onwards, ``columns`` a row."""

    name: str
    image: np.ndarray  # [H, W, 3] uint8, as the model saw it
    first_patch: int
    columns: int

    def to_dict(self) -> dict:
        return {"name": self.name, "first_patch": self.first_patch, "columns": self.columns,
                "rows": self.image.shape[0] * self.columns // self.image.shape[1]}


@dataclass(frozen=True)
class _Token:
    representative: object  # a patch number or CLS
    coverage: frozenset
    contextual: bool = False


def _prune(tokens: list[_Token], kept: list[int], targets: list[int], assignment) -> list[_Token]:
    """One stage on one view's (or block's) ``tokens``: its output, ``[dominant, contextual]``."""
    rest = sorted(set(range(len(tokens))) - set(kept))
    slots = pruning.slots_of(assignment, len(rest), len(targets))[0].tolist()
    groups = [set(tokens[t].coverage) for t in targets]
    for token, slot in zip(rest, slots):
        groups[slot] |= tokens[token].coverage
    return ([_Token(tokens[i].representative, tokens[i].coverage) for i in kept]
            + [_Token(tokens[t].representative, frozenset(g), True) for t, g in zip(targets, groups)])


def _panel(name: str, tokens: list[_Token]) -> Panel:
    dominant = [t for t in tokens if not t.contextual]
    return Panel(name, [t.representative for t in dominant], [sorted(t.coverage) for t in dominant],
                 [{"target": t.representative, "patches": sorted(t.coverage)} for t in tokens if t.contextual])


def keep_map(schedule: Schedule, traces: list, view_patches: torch.Tensor, block_order: torch.Tensor) -> list[Panel]:
    """Panels for sample 0 from the stages' StageTraces (vision stage first).

    ``view_patches`` [views, P] numbers each view's patches on the canvases; ``block_order``
    is the vision unit's layout of the views' outputs (``VisionUnit.block_order``). An LLM stage
    prunes the first ``stage_inputs`` tokens of the block and carries the rest through.
    """
    vision, views = schedule.vision, schedule.views
    trace = traces[0]
    members = schedule.vision_inputs - vision.total  # per view
    outputs = []
    for v in range(views):
        inputs = [_Token(CLS, frozenset())] * schedule.cls_tokens + [_Token(p, frozenset([p])) for p in view_patches[v].tolist()]
        kept = (trace.kept_index[0, v * vision.dominant:(v + 1) * vision.dominant] - v * schedule.vision_inputs).tolist()
        targets = (trace.target_index[0, v * vision.contextual:(v + 1) * vision.contextual] - v * schedule.vision_inputs).tolist()
        assignment = trace.assignment[:1, v * members:(v + 1) * members] - v * vision.contextual
        outputs += _prune(inputs, kept, targets, assignment)
    tokens = [outputs[i] for i in block_order.tolist()]
    panels = [_panel(f"vision: {vision.dominant}+{vision.contextual}{f' per view, {views} views' if views > 1 else ''}", tokens)]
    for stage, block, result in zip(schedule.llm_stages, schedule.stage_inputs(), traces[1:]):
        tokens = _prune(tokens[:block], result.kept_index[0].tolist(), result.target_index[0].tolist(), result.assignment[:1]) + tokens[block:]
        panels.append(_panel(f"after layer {stage.after_layer}: {stage.dominant}+{stage.contextual}", tokens))
    return panels


def _seen(pixels: torch.Tensor, processor) -> np.ndarray:
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    seen = pixels.permute(1, 2, 0).float().numpy() * std + mean
    return (np.clip(seen, 0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def inspect_image(loaded, schedule: Schedule, image, prompt: str) -> tuple[list[Panel], list[Canvas]]:
    """Run one prefill with traces on (a multi-crop ``schedule`` on the image's own grid);
    returns the panels and the canvases they are drawn on."""
    from visiondrop_edge.prompt import pad_token_id
    from visiondrop_edge.runtime.torch_backend import TorchBackend

    backend = TorchBackend(loaded, schedule).for_images(image_sizes([image], loaded.template))
    schedule = backend.spec.schedule
    pixels = pixel_values(loaded.processor.image_processor, [image], loaded.template)
    batch = build_prompts(loaded.tokenizer, loaded.template, [prompt], schedule.image_tokens, loaded.config.image_token_id, pad_token_id(loaded.tokenizer))
    vision = backend.encode_image(pixels)
    prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    unit = backend.pipeline.vision
    drawn, view_patches = unit.canvases(pixels[0])
    patch_size = loaded.config.vision_config.patch_size
    canvases, first = [], 0
    for name, picture in drawn:
        canvases.append(Canvas(name, _seen(picture, loaded.processor.image_processor), first, picture.shape[-1] // patch_size))
        first += (picture.shape[-2] // patch_size) * canvases[-1].columns
    panels = keep_map(schedule, [vision.stage, *prefill.stages], view_patches, unit.block_order(vision.stage.kept_index[0]))
    return panels, canvases


def draw(panels: list[Panel], canvases: list[Canvas], patch_size: int, path: str | Path) -> None:
    """One panel per stage (a row per canvas): dominant patches bright and outlined,
    contextual groups coloured by target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colours = plt.get_cmap("tab20")
    heights = [c.image.shape[0] / c.image.shape[1] for c in canvases]
    figure, axes = plt.subplots(len(canvases), len(panels), figsize=(3.6 * len(panels), 3.6 * sum(heights) + 0.3 * len(canvases)),
                                squeeze=False, gridspec_kw={"height_ratios": heights})
    for canvas, row_axes in zip(canvases, axes):
        image = canvas.image
        count = (image.shape[0] // patch_size) * canvas.columns

        def place(patch):
            """(row slice, column slice, x, y) of ``patch`` on this canvas, or None if it is on another."""
            if patch == CLS or not 0 <= patch - canvas.first_patch < count:
                return None
            row, col = divmod(patch - canvas.first_patch, canvas.columns)
            return np.s_[row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size], col * patch_size, row * patch_size

        for axis, panel in zip(row_axes, panels):
            shade = np.full(image.shape[:2] + (1,), 0.25)
            overlay = np.zeros(image.shape, dtype=float)
            for group_index, group in enumerate(panel.contextual):
                colour = np.array(colours(group_index % 20)[:3])
                for spot in filter(None, map(place, group["patches"])):
                    overlay[spot[0]], shade[spot[0]] = colour, 0.55
            for covered in panel.dominant_coverage:  # patches merged earlier into a now-dominant token
                for spot in filter(None, map(place, covered)):
                    shade[spot[0]] = 0.75
            dominant = list(filter(None, map(place, panel.dominant)))
            for spot in dominant:
                shade[spot[0]], overlay[spot[0]] = 1.0, 0.0
            blend = np.where(overlay.any(-1, keepdims=True), 0.5 * image / 255 + 0.5 * overlay, shade * image / 255)
            axis.imshow(np.clip(blend, 0, 1))
            for _, x, y in dominant:
                axis.add_patch(Rectangle((x, y), patch_size, patch_size, fill=False, edgecolor="white", linewidth=0.6))
            for group_index, group in enumerate(panel.contextual):
                spot = place(group["target"])
                if spot is not None:
                    axis.add_patch(Rectangle(spot[1:], patch_size, patch_size, fill=False, edgecolor=colours(group_index % 20), linewidth=2.0))
            cls_note = f" + {panel.dominant.count(CLS)} CLS" if CLS in panel.dominant else ""
            title = f"{panel.name}\n{len(dominant)} dominant patches{cls_note if canvas is canvases[0] else ''}"
            groups = sum(place(g["target"]) is not None or (g["target"] == CLS and canvas is canvases[0]) for g in panel.contextual)
            axis.set_title(f"{title}, {groups} groups" + (f" ({canvas.name})" if len(canvases) > 1 else ""), fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def panels_json(panels: list[Panel]) -> list[dict]:
    return [asdict(p) for p in panels]

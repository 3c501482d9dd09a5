"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): multi-crop "anyres" images, CLIP tower with CLS.

The processor cuts an image into a base view (the whole image, squashed to one crop) and
``rows x cols`` crops of the image resized and padded to its best pinpoint (HF's rule, ties
included). Stage 0 is LLaVA-1.5's, run on every view alone with the same ``k+c``, each view
keeping its own CLS (the authors' code); the views' outputs are then laid out as

    [base (k+c) | the crops' kept patches in raster order over the stitched, padded grid | crop CLS (M) | contextual (M*c)]

with no unpad and no newline, so ``(M+1)(k+c)`` tokens whatever the aspect ratio. Without
pruning the unit is HF's ``pack_image_features`` (unpad, one newline per row), so the full
budget is HF's behaviour. See ``../shared/VISIONDROP_NEXT_REFERENCE.md`` and the NeXT issue.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from visiondrop_edge import pruning
from visiondrop_edge.errors import CheckpointError, InputError, SettingError
from visiondrop_edge.schedule import CropGrid, Schedule

from .base import VisionUnit, register_family
from .llava import PLAIN, ClipVisionUnit, Llava15, _integer


def unpadded_grid(image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """HF's unpadding of a stitched ``grid`` (height, width in patches) for an image of
    ``image_size`` (height, width): the same centred margin is cut from both sides."""
    height, width = image_size
    grid_height, grid_width = grid
    if width / height > grid_width / grid_height:
        margin = (grid_height - int(round(height * (grid_width / width), 7))) // 2
        return grid_height - 2 * margin, grid_width
    margin = (grid_width - int(round(width * (grid_height / height), 7))) // 2
    return grid_height, grid_width - 2 * margin


def raster_keys(kept_patches: Tensor, grid: CropGrid, side: int) -> Tensor:
    """Global raster index [B, M, K] of each crop's kept patches over the stitched padded grid.

    ``kept_patches`` [B, M, K] are patch ids (row-major in a ``side x side`` crop) of the crops
    in row-major crop order: crop ``m = r * cols + q``, patch ``p = i * side + j`` sits at
    ``(side * r + i) * side * cols + side * q + j``.
    """
    crop = torch.arange(grid.crops, device=kept_patches.device).view(1, -1, 1)
    row = (crop // grid.cols) * side + kept_patches // side
    column = (crop % grid.cols) * side + kept_patches % side
    return row * (side * grid.cols) + column


class AnyresLayout(nn.Module):
    """The weightless half of a multi-crop vision unit, for one grid class: the views' stage
    outputs [B, views, ...] (the per-view unit's, which the views share) -> the image's.

    The stage outputs are the views' concatenated: view ``v``'s token ``t`` is ``v * N + t`` for
    ``N`` tokens per view, and a contextual slot ``s`` of view ``v`` is ``v * c + s``. The
    visual block is laid out as the module docstring says.
    """

    def __init__(self, model: nn.Module, schedule: Schedule):
        super().__init__()
        self.stage = schedule.vision
        self.grid = schedule.grid
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size
        self.view_tokens = self.side**2 + 1
        self.image_newline = model.model.image_newline  # the unpruned packing's only weight

    def forward(self, image_embeds: Tensor, *stage: Tensor) -> tuple[Tensor, ...]:
        if self.stage is None:
            return (self.pack_unpruned(image_embeds),)
        kept, target, scores, assignment, metric = stage
        view = torch.arange(image_embeds.shape[1], device=kept.device).view(1, -1, 1)
        return (
            self.lay_out(image_embeds, kept),
            (kept + view * self.view_tokens).flatten(1),
            (target + view * self.view_tokens).flatten(1),
            scores.flatten(1),
            (assignment + view * self.stage.contextual).flatten(1),
            metric.flatten(1, 2),
        )

    def lay_out(self, embeds: Tensor, kept: Tensor) -> Tensor:
        """Per-view stage outputs [B, views, k+c, D] (``[CLS, k-1 patches ascending, c contextual]``)
        and their kept indices [B, views, k] -> the visual block [B, views * (k+c), D]."""
        k = self.stage.dominant
        crops, crop_kept = embeds[:, 1:], kept[:, 1:, 1:]  # the crops; their kept patches' token ids (CLS = 0)
        keys = raster_keys(crop_kept - 1, self.grid, self.side).flatten(1)
        order = keys.argsort(dim=1)  # distinct keys: a permutation, the same on every backend
        patches = pruning.gather_rows(crops[:, :, 1:k].flatten(1, 2), order)
        return torch.cat([embeds[:, 0], patches, crops[:, :, 0], crops[:, :, k:].flatten(1, 2)], dim=1)

    def pack_unpruned(self, features: Tensor) -> Tensor:
        """HF's packing without pruning: [B, views, side^2, D] -> the base view, then the crops
        stitched, unpadded, each row followed by the newline embedding."""
        batch, _, _, width = features.shape
        rows, cols, side = self.grid.rows, self.grid.cols, self.side
        stitched = features[:, 1:].reshape(batch, rows, cols, side, side, width).permute(0, 1, 3, 2, 4, 5)
        stitched = stitched.reshape(batch, rows * side, cols * side, width)
        height, kept_width = self.grid.unpadded
        top, left = (rows * side - height) // 2, (cols * side - kept_width) // 2
        kept = stitched[:, top:top + height, left:left + kept_width]
        newline = self.image_newline.to(kept.dtype).expand(batch, height, 1, width)
        return torch.cat([features[:, 0], torch.cat([kept, newline], dim=2).flatten(1, 2)], dim=1)


class AnyresVisionUnit(VisionUnit):
    """A multi-crop image's vision unit for one grid class: ``pixel_values`` [B, views, 3, H, W]
    (base view first, then the crops row-major, as the processor emits them).

    Two parts, exported as two graphs so that the tower's weights are stored once for every
    grid class: ``per_view``, LLaVA-1.5's unit (tower, stage-0 prune, projector) on every
    view alone, and ``layout``, the grid's weightless :class:`AnyresLayout`.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, ops: tuple = pruning.REFERENCE_OPS):
        super().__init__()
        if schedule.grid is None:
            raise SettingError("a LLaVA-NeXT pipeline runs the schedule of one crop grid: make it with the image's "
                               "(LoadedModel.schedule(..., grid=LoadedModel.crop_grid((height, width))))")
        self.per_view = ClipVisionUnit(model, schedule.vision, ops)
        self.layout = AnyresLayout(model, schedule)
        self.stage = schedule.vision
        self.grid = schedule.grid
        self.view_tokens = self.layout.view_tokens

    def project(self, tokens: Tensor) -> Tensor:
        return self.per_view.project(tokens)

    def tower_tokens(self, pixel_values: Tensor) -> Tensor:
        """Every view's tower tokens, views concatenated: [B, views * N, D]."""
        tokens = self.per_view.tower_tokens(self._views(pixel_values))
        return tokens.reshape(pixel_values.shape[0], -1, tokens.shape[-1])

    def canvases(self, pixel_values: Tensor) -> tuple[list[tuple[str, Tensor]], Tensor]:
        """The base view, then the crops stitched into the resized, padded image (patches in
        global raster order over it, :func:`raster_keys`)."""
        rows, cols, side = self.grid.rows, self.grid.cols, self.layout.side
        channels, height, width = pixel_values.shape[1:]
        stitched = pixel_values[1:].reshape(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
        patches = torch.arange(side**2)
        crops = raster_keys(patches.expand(1, self.grid.crops, -1), self.grid, side)[0] + side**2
        return [("base view", pixel_values[0]), ("crops", stitched.reshape(channels, rows * height, cols * width))], \
            torch.cat([patches.unsqueeze(0), crops])

    def block_order(self, kept_index: Tensor) -> Tensor:
        """The layout applied to the outputs' own numbers (the layout's code, not a copy of it)."""
        views, k, total = self.grid.views, self.stage.dominant, self.stage.total
        numbers = torch.arange(views * total, dtype=torch.float32, device=kept_index.device).view(1, views, total, 1)
        kept = kept_index.view(1, views, k) - self.view_tokens * torch.arange(views, device=kept_index.device).view(1, -1, 1)
        return self.layout.lay_out(numbers, kept)[0, :, 0].long()

    def _views(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != self.grid.views:
            raise InputError(
                f"pixel_values of shape {list(pixel_values.shape)} do not hold the {self.grid.views} views of a "
                f"{self.grid.describe()} crop grid: use the schedule of the image's own grid"
            )
        return pixel_values.flatten(0, 1)

    def forward(self, pixel_values: Tensor, forced: pruning.Choice | None = None) -> tuple[Tensor, ...]:
        batch, views = pixel_values.shape[:2]
        outputs = self.per_view(self._views(pixel_values), self._per_view(forced, batch, views))
        return self.layout(*(t.unflatten(0, (batch, views)) for t in outputs))

    def _per_view(self, forced: pruning.Choice | None, batch: int, views: int) -> pruning.Choice | None:
        """A forced choice in the image's numbering -> each view's own."""
        if forced is None:
            return None
        view = torch.arange(views, device=forced.kept_index.device).view(1, -1, 1)
        kept = forced.kept_index.view(batch, views, -1) - view * self.view_tokens
        assignment = forced.assignment.view(batch, views, -1) - view * self.stage.contextual
        return pruning.Choice(kept.flatten(0, 1), assignment.flatten(0, 1))


@register_family
class LlavaNext(Llava15):
    """LLaVA-1.5's parts (CLIP tower, projector, Llama/Mistral decoder) over multi-crop images:
    what differs is the grid, the per-view pipeline and the config's pinpoints."""

    name = "llava-next"
    architecture = "LlavaNextForConditionalGeneration"
    model_class = LlavaNextForConditionalGeneration
    model_type = "llava_next"
    paper_budgets = ("160", "320", "640")  # averages for a 2x2 grid (five views)
    conversations = {PLAIN.name: PLAIN}  # llava_v1's pad-to-square is LLaVA-1.5's preprocessing

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str) -> None:
        super().check_config(config, where)
        image_size = _integer(config, "vision_config", "image_size", CLIPVisionConfig().image_size, where)
        pinpoints = config.get("image_grid_pinpoints")
        if pinpoints is None:
            return  # transformers fills LLaVA-NeXT's default pinpoints
        valid = isinstance(pinpoints, list) and pinpoints and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and x > 0 and x % image_size == 0 for x in p)
            for p in pinpoints)
        if not valid:
            raise CheckpointError(
                f"{where}: config.json's image_grid_pinpoints must be [height, width] pairs of whole multiples of the "
                f"{image_size}-pixel crop (got {pinpoints!r})"
            )

    @staticmethod
    def crop_layout(config: Any) -> dict[str, Any]:
        vision = config.vision_config
        return {"crop": vision.image_size, "side": vision.image_size // vision.patch_size,
                "pinpoints": [list(p) for p in config.image_grid_pinpoints]}

    @staticmethod
    def crop_grid(layout: dict[str, Any], image_size: tuple[int, int]) -> CropGrid:
        """The grid HF's processor cuts an image of ``image_size`` (height, width) into: its best
        pinpoint, read as (height, width) with ties to the first (the authors read (width,
        height), which differs for images with both sides at most one crop: same count, the
        crops transposed). ``unpadded`` is what the full budget keeps."""
        crop, side = layout["crop"], layout["side"]
        best_height, best_width = select_best_resolution(tuple(image_size), [tuple(p) for p in layout["pinpoints"]])
        rows, cols = best_height // crop, best_width // crop
        return CropGrid(rows, cols, unpadded_grid(tuple(image_size), (rows * side, cols * side)))

    @staticmethod
    def grid_classes(layout: dict[str, Any]) -> list[CropGrid]:
        """One grid per distinct pinpoint, in the config's order."""
        grids = [CropGrid(height // layout["crop"], width // layout["crop"]) for height, width in layout["pinpoints"]]
        return list(dict.fromkeys(grids))

    @classmethod
    def pipeline_vision(cls, model: nn.Module, schedule: Schedule, ops: tuple) -> VisionUnit:
        return AnyresVisionUnit(model, schedule, ops)

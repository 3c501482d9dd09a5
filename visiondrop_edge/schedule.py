"""Token budgets and pruning schedules.

A schedule is the list of prune stages: stage 0 sits in the vision encoder, each further
stage after an LLM decoder layer. ``--budget N`` is the paper's convention: the average
number of visual tokens an LLM layer sees. Every count is a constant once the schedule is
fixed, which is what makes the exported graphs static.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .errors import SettingError, UserError

# The published LLaVA-1.5 setting for an average of 32 tokens per layer:
# vision 42+6, then 30+5 / 22+4 / 16+3 after 1/4, 1/2 and 3/4 of the decoder.
# Every other budget scales this shape.
BASE_BUDGET = 32
BASE_VISION = (42, 6)
BASE_LLM = ((30, 5), (22, 4), (16, 3))
BASE_LLM_FRACTIONS = (0.25, 0.5, 0.75)

FULL = "full"
DEFAULT_BUDGET = 128

# Which visual tokens the LLM stages of a multi-crop image prune: the whole block (default),
# or only the base view's block, carrying the crops' tokens through (the authors' released code).
SCOPES = ("block", "base")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Stage:
    """One prune: keep ``dominant`` tokens by score and fold the rest into ``contextual`` ones.

    ``after_layer`` is 0 for the vision-encoder stage, else the 1-based decoder layer after
    which the stage runs (the next layer's weights score it and consume its output).
    For the vision stage ``dominant`` counts the CLS token, which is always kept.
    """

    after_layer: int
    dominant: int
    contextual: int

    @property
    def total(self) -> int:
        return self.dominant + self.contextual

    @property
    def is_vision(self) -> bool:
        return self.after_layer == 0

    def describe(self) -> str:
        counts = f"{self.dominant}+{self.contextual}"
        return counts if self.is_vision else f"{self.after_layer}:{counts}"


@dataclass(frozen=True)
class CropGrid:
    """A multi-crop image (LLaVA-NeXT's "anyres"): a base view of the whole image, then
    ``rows x cols`` crops of the resized and padded image, row-major.

    A pruned schedule's token counts depend on the number of crops only, the order of the
    crops' tokens on the grid's shape too. ``unpadded`` belongs to the full budget (no
    pruning, HF's packing): the (height, width) of the stitched patch grid without its
    padding, each row followed by one newline token.
    """

    rows: int
    cols: int
    unpadded: tuple[int, int] | None = None

    @property
    def crops(self) -> int:
        return self.rows * self.cols

    @property
    def views(self) -> int:
        return self.crops + 1

    def describe(self) -> str:
        return f"{self.rows}x{self.cols}"

    def filled(self, side: int) -> CropGrid:
        """This grid for an image that fills it exactly (nothing to unpad), ``side`` patches a crop."""
        return replace(self, unpadded=(self.rows * side, self.cols * side))


# Multi-crop images (LLaVA-NeXT): ``--budget B`` is the average for a 2x2 grid, five views
# (the base view and four crops); each view gets the LLaVA-1.5 schedule for B / 5.
REFERENCE_GRID = CropGrid(2, 2)
REFERENCE_VIEWS = REFERENCE_GRID.views


@dataclass(frozen=True)
class Schedule:
    """The prune stages for one model: empty ``stages`` means no pruning (HF's behaviour).

    ``num_patches`` is the vision encoder's patch count (576 for CLIP ViT-L/14 at 336 px),
    ``cls_tokens`` the tokens the tower adds that the vision stage always keeps (CLIP's CLS: 1;
    the model family says); ``num_layers`` the decoder depth. Construct with
    :meth:`from_budget` or :meth:`parse`; both validate.

    A multi-crop image has a ``grid``: the vision stage then prunes each view alone with the
    same ``k+c`` (so ``(crops + 1)(k+c)`` tokens enter the LLM) and each LLM stage keeps its
    ``k+c`` of the block ``scope`` names (see :data:`SCOPES`).
    """

    stages: tuple[Stage, ...]
    num_layers: int
    num_patches: int
    cls_tokens: int = 1
    grid: CropGrid | None = None
    scope: str = "block"

    # ----------------------------------------------------------------- queries
    @property
    def is_full(self) -> bool:
        return not self.stages

    @property
    def vision(self) -> Stage | None:
        return self.stages[0] if self.stages else None

    @property
    def llm_stages(self) -> tuple[Stage, ...]:
        return self.stages[1:]

    @property
    def vision_inputs(self) -> int:
        """Tokens the vision stage ranks: the patches and the tower's CLS, if it has one."""
        return self.num_patches + self.cls_tokens

    @property
    def views(self) -> int:
        """Images the vision stage prunes one by one: 1, or a multi-crop image's base and crops."""
        return self.grid.views if self.grid else 1

    @property
    def image_tokens(self) -> int:
        """Visual tokens spliced into the prompt (the vision stage's output)."""
        if self.stages:
            return self.views * self.stages[0].total
        if self.grid is None:
            return self.num_patches
        height, width = self.grid.unpadded
        return self.num_patches + height * (width + 1)  # HF: the base view, then the unpadded crops with newlines

    def stage_inputs(self) -> list[int]:
        """The size of the block each LLM stage prunes (it starts where the image does)."""
        first = self.stages[0].total if self.scope == "base" and self.stages else self.image_tokens
        return ([first] + [s.total for s in self.llm_stages])[:len(self.llm_stages)]

    @property
    def carried_tokens(self) -> int:
        """Visual tokens the LLM stages carry through unpruned (the crops' in ``base`` scope)."""
        return self.image_tokens - self.stage_inputs()[0] if self.llm_stages else 0

    def group_tokens(self) -> list[int]:
        """Visual tokens each decoder group sees: the image's, then each LLM stage's output and
        the tokens it carries through."""
        return [self.image_tokens] + [s.total + self.carried_tokens for s in self.llm_stages]

    def tokens_per_layer(self) -> list[int]:
        """Visual tokens each decoder layer (0-based) sees."""
        counts = []
        for (start, stop), tokens in zip(self.layer_groups(), self.group_tokens()):
            counts += [tokens] * (stop - start)
        return counts

    def average_tokens(self) -> float:
        counts = self.tokens_per_layer()
        return sum(counts) / len(counts)

    def layer_groups(self) -> list[tuple[int, int]]:
        """Half-open 0-based decoder layer ranges between prune points."""
        cuts = [0] + [s.after_layer for s in self.llm_stages] + [self.num_layers]
        return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]

    def describe(self) -> str:
        return FULL if self.is_full else ",".join(s.describe() for s in self.stages)

    def per_view(self) -> tuple[Stage, ...]:
        """A multi-crop schedule's stages as one view's (what ``--schedule`` spells for it):
        ``block`` scope's LLM stages keep ``views`` times these counts."""
        views = self.views if self.scope == "block" else 1
        return self.stages[:1] + tuple(Stage(s.after_layer, s.dominant // views, s.contextual // views) for s in self.llm_stages)

    def for_grids(self, grids: list[CropGrid]) -> list[Schedule]:
        """The schedules an export of this one has vision (and prune) graphs for: itself, or for
        a pruned multi-crop schedule one per grid class (unpruned, HF unpads per image, so the
        shapes are this schedule's image size's only)."""
        if self.grid is None or self.is_full:
            return [self]
        return [self.for_grid(grid) for grid in grids]

    def for_grid(self, grid: CropGrid) -> Schedule:
        """The same per-view schedule and scope on another image's ``grid`` (a full schedule
        needs the grid's ``unpadded`` size, the image's own)."""
        if self.grid is None:
            raise ValueError("for_grid needs a multi-crop schedule")
        return Schedule._validated(_for_scope(self.per_view(), grid, self.scope), self.num_layers, self.num_patches,
                                   self.cls_tokens, grid=grid, scope=self.scope)

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data = {
            "num_layers": self.num_layers,
            "num_patches": self.num_patches,
            "cls_tokens": self.cls_tokens,
            "stages": [
                {"after_layer": s.after_layer, "dominant": s.dominant, "contextual": s.contextual}
                for s in self.stages
            ],
            "spec": self.describe(),
            "average_tokens_per_layer": self.average_tokens(),
        }
        if self.grid is not None:
            unpadded = list(self.grid.unpadded) if self.grid.unpadded else None
            data |= {"grid": {"rows": self.grid.rows, "cols": self.grid.cols, "unpadded": unpadded}, "scope": self.scope}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        stages = tuple(
            Stage(int(s["after_layer"]), int(s["dominant"]), int(s["contextual"]))
            for s in data["stages"]
        )
        grid = data.get("grid")
        if grid is not None:
            unpadded = tuple(int(x) for x in grid["unpadded"]) if grid.get("unpadded") else None
            grid = CropGrid(int(grid["rows"]), int(grid["cols"]), unpadded)
        return cls._validated(stages, int(data["num_layers"]), int(data["num_patches"]), int(data.get("cls_tokens", 1)),
                              grid=grid, scope=str(data.get("scope", "block")))

    # ---------------------------------------------------------------- construction
    @classmethod
    def full(cls, num_layers: int, num_patches: int, cls_tokens: int = 1, grid: CropGrid | None = None) -> Schedule:
        return cls._validated((), num_layers, num_patches, cls_tokens, grid=grid)

    @classmethod
    def from_budget(
        cls, budget: str | int, num_layers: int, num_patches: int, cls_tokens: int = 1, grid: CropGrid | None = None,
        scope: str = "block",
    ) -> Schedule:
        """The paper's schedule shape scaled to an average of ``budget`` tokens per layer.

        With a ``grid`` the budget is the average for a 2x2 grid: every view gets the
        schedule for ``budget / 5`` and the LLM stages keep ``views`` times its counts
        (``block`` scope; ``base`` scope keeps them per view), so a smaller grid sees
        proportionally fewer tokens. :meth:`average_tokens` reports what this grid gets.
        """
        text = str(budget).strip().lower()
        if text == FULL or (grid is None and text == str(num_patches)):
            return cls.full(num_layers, num_patches, cls_tokens, grid)
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 1:
            raise UserError(
                f"budget '{budget}' is not a positive integer: use an integer between 1 and "
                f"{max_budget(num_layers, num_patches, cls_tokens, grid)}, or 'full'{'' if grid else f' ({num_patches})'} for no pruning"
            )
        per_view = _scaled_stages(value / (REFERENCE_VIEWS if grid else 1), num_layers)
        return cls._validated(_for_scope(per_view, grid, scope), num_layers, num_patches, cls_tokens, budget=value,
                              grid=grid, scope=scope)

    @classmethod
    def parse(
        cls, text: str, num_layers: int, num_patches: int, cls_tokens: int = 1, grid: CropGrid | None = None,
        scope: str = "block",
    ) -> Schedule:
        """Parse an explicit schedule such as ``"42+6,8:30+5,16:22+4,24:16+3"``.

        The first item is the vision stage (``k+c``, k counting CLS); every further item is
        ``layer:k+c`` with ``layer`` the 1-based decoder layer the stage follows. With a
        ``grid`` the counts are per view, as for :meth:`from_budget`.
        """
        if text.strip().lower() == FULL:
            return cls.full(num_layers, num_patches, cls_tokens, grid)
        stages = []
        for position, item in enumerate(i.strip() for i in text.split(",")):
            layer_text, _, counts = item.rpartition(":")
            k_text, plus, c_text = counts.partition("+")
            try:
                layer = int(layer_text) if layer_text else 0
                k, c = int(k_text), int(c_text)
            except ValueError:
                layer = k = c = -1
            if not plus or k < 0 or c < 0 or layer < 0 or (position == 0) != (layer_text == ""):
                raise UserError(
                    f"schedule item '{item}' is malformed: write the vision stage as 'k+c' first, "
                    "then 'layer:k+c' per decoder stage, e.g. '42+6,8:30+5,16:22+4,24:16+3'"
                )
            stages.append(Stage(layer, k, c))
        return cls._validated(_for_scope(tuple(stages), grid, scope), num_layers, num_patches, cls_tokens,
                              grid=grid, scope=scope)

    @classmethod
    def _validated(
        cls, stages: tuple[Stage, ...], num_layers: int, num_patches: int, cls_tokens: int, budget: int | None = None,
        grid: CropGrid | None = None, scope: str = "block",
    ) -> Schedule:
        if grid is not None and stages:
            grid = replace(grid, unpadded=None)  # a pruned schedule depends on the grid class only
        problem = _grid_problem(stages, num_patches, grid, scope) or _schedule_problem(
            stages, num_layers, num_patches, cls_tokens, grid.views if grid and scope == "block" else 1)
        if problem is not None:
            if budget is not None:
                raise UserError(
                    f"budget {budget} is out of range for this model ({problem}): use an integer "
                    f"between 1 and {max_budget(num_layers, num_patches, cls_tokens, grid)}, or 'full' "
                    f"{'' if grid else f'({num_patches}) '}for no pruning"
                )
            raise UserError(f"invalid schedule: {problem}")
        return cls(stages, num_layers, num_patches, cls_tokens, grid, scope)


def _for_scope(per_view: tuple[Stage, ...], grid: CropGrid | None, scope: str) -> tuple[Stage, ...]:
    """Per-view stages -> a multi-crop image's: the LLM stages of ``block`` scope keep ``views``
    times the per-view counts (they prune all views' tokens at once)."""
    if grid is None or scope != "block":
        return per_view
    views = grid.views
    return per_view[:1] + tuple(Stage(s.after_layer, s.dominant * views, s.contextual * views) for s in per_view[1:])


def _grid_problem(stages: tuple[Stage, ...], num_patches: int, grid: CropGrid | None, scope: str) -> str | None:
    """Why ``grid``/``scope`` do not fit, or None."""
    if scope not in SCOPES:
        return f"LLM-stage scope '{scope}' is not one of {', '.join(SCOPES)}"
    if grid is None:
        return "the 'base' LLM-stage scope needs a multi-crop image" if scope != "block" else None
    if grid.rows < 1 or grid.cols < 1:
        return f"a crop grid of {grid.describe()} has no crops"
    side = math.isqrt(num_patches)
    if not stages:
        if grid.unpadded is None:
            return "the full budget of a multi-crop image needs its unpadded patch grid"
        height, width = grid.unpadded
        if not (1 <= height <= side * grid.rows and 1 <= width <= side * grid.cols):
            return f"unpadded grid {height}x{width} does not fit {grid.describe()} crops of {side}x{side} patches"
    return None


def _scaled_stages(budget: float, num_layers: int) -> tuple[Stage, ...]:
    scale = budget / BASE_BUDGET

    def scaled(k: int, c: int) -> tuple[int, int]:
        return max(1, _round_half_up(k * scale)), max(1, _round_half_up(c * scale))

    stages = [Stage(0, *scaled(*BASE_VISION))]
    for fraction, (k, c) in zip(BASE_LLM_FRACTIONS, BASE_LLM):
        stages.append(Stage(_round_half_up(num_layers * fraction), *scaled(k, c)))
    return tuple(stages)


def _schedule_problem(
    stages: tuple[Stage, ...], num_layers: int, num_patches: int, cls_tokens: int, views: int = 1
) -> str | None:
    """Why ``stages`` cannot run on this model, or None if they can. The first LLM stage
    prunes ``views`` times the vision stage's output."""
    if not stages:
        return None
    vision = stages[0]
    if not vision.is_vision:
        return "the first stage must be the vision stage (written 'k+c', no layer)"
    available = num_patches + cls_tokens
    encoder = "(patches + CLS)" if cls_tokens else "(patches)"
    previous_layer = 0
    for index, stage in enumerate(stages):
        name = "vision stage" if index == 0 else f"stage after layer {stage.after_layer}"
        if stage.dominant < 1 or stage.contextual < 1:
            return f"{name} has {stage.dominant}+{stage.contextual}; both counts must be at least 1"
        if index > 0:
            if not 1 <= stage.after_layer <= num_layers - 1:
                return (
                    f"{name}: layers run from 1 to {num_layers - 1} on this {num_layers}-layer "
                    "decoder (a stage needs a next layer to score it)"
                )
            if stage.after_layer <= previous_layer:
                return (
                    f"stage layers must strictly increase, got {stage.after_layer} after "
                    f"{previous_layer}"
                )
            previous_layer = stage.after_layer
        if stage.total > available:
            if index == 0:
                return (
                    f"vision stage keeps {stage.total} tokens but the encoder has only {available} "
                    f"{encoder}: k+c must be at most {available}"
                )
            return (
                f"{name} keeps {stage.total} tokens, more than the {available} the stage before "
                "keeps: counts must not grow"
            )
        available = stage.total * (views if index == 0 else 1)
    return None


def max_budget(num_layers: int, num_patches: int, cls_tokens: int = 1, grid: CropGrid | None = None) -> int:
    """The largest ``--budget`` whose scaled schedule fits the encoder (per view, with a ``grid``)."""
    per_view = REFERENCE_VIEWS if grid else 1
    best = 1
    for budget in range(1, num_patches * per_view):
        if _schedule_problem(_scaled_stages(budget / per_view, num_layers), num_layers, num_patches, cls_tokens) is None:
            best = budget
    return best


def resolve_schedule(
    budget: str | int | None, schedule: str | None, num_layers: int, num_patches: int, cls_tokens: int = 1,
    grid: CropGrid | None = None, scope: str = "block",
) -> Schedule:
    """The schedule a command asked for (``--budget`` defaults to 128; not both may be given)."""
    if schedule is not None and budget is not None:
        raise SettingError("give either {budget} or {schedule}, not both")
    if schedule is not None:
        return Schedule.parse(schedule, num_layers, num_patches, cls_tokens, grid, scope)
    if num_layers < 4 and str(budget).lower() != FULL:
        raise SettingError(f"a {num_layers}-layer decoder is too shallow for the budget schedules (need 4+ layers): "
                           "pass an explicit {{schedule}}")
    return Schedule.from_budget(DEFAULT_BUDGET if budget is None else budget, num_layers, num_patches, cls_tokens,
                                grid, scope)

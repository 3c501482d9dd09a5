"""Token budgets and pruning schedules.

A schedule is the list of prune stages: stage 0 sits in the vision encoder, each further
stage after an LLM decoder layer. ``--budget N`` is the paper's convention: the average
number of visual tokens an LLM layer sees. Every count is a constant once the schedule is
fixed, which is what makes the exported graphs static.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
class Schedule:
    """The prune stages for one model: empty ``stages`` means no pruning (HF's behaviour).

    ``num_patches`` is the vision encoder's patch count (576 for CLIP ViT-L/14 at 336 px),
    ``cls_tokens`` the tokens the tower adds that the vision stage always keeps (CLIP's CLS: 1;
    the model family says); ``num_layers`` the decoder depth. Construct with
    :meth:`from_budget` or :meth:`parse`; both validate.
    """

    stages: tuple[Stage, ...]
    num_layers: int
    num_patches: int
    cls_tokens: int = 1

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
    def image_tokens(self) -> int:
        """Visual tokens spliced into the prompt (the vision stage's output)."""
        return self.stages[0].total if self.stages else self.num_patches

    def tokens_per_layer(self) -> list[int]:
        """Visual tokens each decoder layer (0-based) sees."""
        counts = []
        current = self.image_tokens
        boundaries = {s.after_layer: s.total for s in self.llm_stages}
        for layer in range(self.num_layers):
            if layer in boundaries:  # stage after (1-based) layer == before 0-based layer
                current = boundaries[layer]
            counts.append(current)
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

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        stages = tuple(
            Stage(int(s["after_layer"]), int(s["dominant"]), int(s["contextual"]))
            for s in data["stages"]
        )
        return cls._validated(stages, int(data["num_layers"]), int(data["num_patches"]), int(data.get("cls_tokens", 1)))

    # ---------------------------------------------------------------- construction
    @classmethod
    def full(cls, num_layers: int, num_patches: int, cls_tokens: int = 1) -> Schedule:
        return cls((), num_layers, num_patches, cls_tokens)

    @classmethod
    def from_budget(cls, budget: str | int, num_layers: int, num_patches: int, cls_tokens: int = 1) -> Schedule:
        """The paper's schedule shape scaled to an average of ``budget`` tokens per layer."""
        text = str(budget).strip().lower()
        if text in (FULL, str(num_patches)):
            return cls.full(num_layers, num_patches, cls_tokens)
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 1:
            raise UserError(
                f"budget '{budget}' is not a positive integer: use an integer between 1 and "
                f"{max_budget(num_layers, num_patches, cls_tokens)}, or 'full' ({num_patches}) for no pruning"
            )
        return cls._validated(_scaled_stages(value, num_layers), num_layers, num_patches, cls_tokens, budget=value)

    @classmethod
    def parse(cls, text: str, num_layers: int, num_patches: int, cls_tokens: int = 1) -> Schedule:
        """Parse an explicit schedule such as ``"42+6,8:30+5,16:22+4,24:16+3"``.

        The first item is the vision stage (``k+c``, k counting CLS); every further item is
        ``layer:k+c`` with ``layer`` the 1-based decoder layer the stage follows.
        """
        if text.strip().lower() == FULL:
            return cls.full(num_layers, num_patches, cls_tokens)
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
        return cls._validated(tuple(stages), num_layers, num_patches, cls_tokens)

    @classmethod
    def _validated(
        cls, stages: tuple[Stage, ...], num_layers: int, num_patches: int, cls_tokens: int, budget: int | None = None
    ) -> Schedule:
        problem = _schedule_problem(stages, num_layers, num_patches, cls_tokens)
        if problem is not None:
            if budget is not None:
                raise UserError(
                    f"budget {budget} is out of range for this model ({problem}): use an integer "
                    f"between 1 and {max_budget(num_layers, num_patches, cls_tokens)}, or 'full' "
                    f"({num_patches}) for no pruning"
                )
            raise UserError(f"invalid schedule: {problem}")
        return cls(stages, num_layers, num_patches, cls_tokens)


def _scaled_stages(budget: int, num_layers: int) -> tuple[Stage, ...]:
    scale = budget / BASE_BUDGET

    def scaled(k: int, c: int) -> tuple[int, int]:
        return max(1, _round_half_up(k * scale)), max(1, _round_half_up(c * scale))

    stages = [Stage(0, *scaled(*BASE_VISION))]
    for fraction, (k, c) in zip(BASE_LLM_FRACTIONS, BASE_LLM):
        stages.append(Stage(_round_half_up(num_layers * fraction), *scaled(k, c)))
    return tuple(stages)


def _schedule_problem(stages: tuple[Stage, ...], num_layers: int, num_patches: int, cls_tokens: int) -> str | None:
    """Why ``stages`` cannot run on this model, or None if they can."""
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
        available = stage.total
    return None


def max_budget(num_layers: int, num_patches: int, cls_tokens: int = 1) -> int:
    """The largest ``--budget`` whose scaled schedule fits the encoder."""
    best = 1
    for budget in range(1, num_patches):
        if _schedule_problem(_scaled_stages(budget, num_layers), num_layers, num_patches, cls_tokens) is None:
            best = budget
    return best


def resolve_schedule(
    budget: str | int | None, schedule: str | None, num_layers: int, num_patches: int, cls_tokens: int = 1
) -> Schedule:
    """The schedule a command asked for (``--budget`` defaults to 128; not both may be given)."""
    if schedule is not None and budget is not None:
        raise SettingError("give either {budget} or {schedule}, not both")
    if schedule is not None:
        return Schedule.parse(schedule, num_layers, num_patches, cls_tokens)
    if num_layers < 4 and str(budget).lower() != FULL:
        raise UserError(
            f"a {num_layers}-layer decoder is too shallow for the budget schedules (need 4+ layers): "
            "pass an explicit --schedule"
        )
    return Schedule.from_budget(DEFAULT_BUDGET if budget is None else budget, num_layers, num_patches, cls_tokens)

"""What a model family tells the pipeline, and the registry that finds a checkpoint's family.

Everything the pipeline knows about an architecture comes from its :class:`Family`: how to
check a ``config.json`` before anything loads, how to load it, the vision tower's patch
grid and whether it has a CLS token, the family's vision unit (tower + stage-0 prune +
projector), where the decoder's parts are, and the prompt template. The rest of the code
(schedules, the LLM-stage prunes, export, every backend) is family-agnostic. Families
register with :func:`register_family`, the way Optimum registers one ``OnnxConfig`` per
architecture; :func:`family_for_config` picks the one that accepts a config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from visiondrop_edge.errors import CheckpointError
from visiondrop_edge.schedule import CropGrid, Schedule, Stage


@dataclass(frozen=True)
class VisionGeometry:
    """One crop's patch grid as the vision tower sees it."""

    image_size: int  # pixels per side of the (square) crop
    patch_size: int  # pixels per side of a patch
    has_cls: bool  # the tower prepends a CLS token, which the vision stage always keeps

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def cls_tokens(self) -> int:
        return int(self.has_cls)

    def patch_of(self, token: int) -> int | None:
        """The row-major patch index of vision-stage input ``token`` (None for CLS)."""
        patch = token - self.cls_tokens
        return patch if patch >= 0 else None


@dataclass(frozen=True)
class DecoderParts:
    """Where a Llama-style decoder's pieces are in a loaded model (shared, not copied)."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module


@dataclass(frozen=True)
class PromptTemplate:
    """How a question and an image become model inputs: ``{prompt}`` is the question,
    ``<image>`` the visual block. Recorded in manifests, so artifacts prompt as exported."""

    first_turn: str  # e.g. "USER: <image>\n{prompt} ASSISTANT:"
    follow_up: str  # a later chat turn, after the previous answer's EOS
    name: str = "plain"  # which of the family's conversations (``Family.conversation``)
    image_placeholder: str = "<image>"
    chunked: bool = False  # tokenise the text before and after the image separately (LLaVA's tokenizer_image_token)
    pad_to_square: bool = False  # pad images to a square in the processor's mean colour first (LLaVA's image_aspect_ratio=pad)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def image_first(self) -> bool:
        """Whether the question comes after the image: then the image's pruning (causal, visual
        queries only) cannot depend on it, and one prefill of the image serves every question."""
        return self.first_turn.index(self.image_placeholder) < self.first_turn.index("{prompt}")


class VisionUnit(nn.Module):
    """A family's vision unit: pixels -> image embeddings, with the stage-0 prune inside.

    ``forward(pixel_values, forced=None)`` returns the fields of
    :class:`visiondrop_edge.contract.VisionOutputs` (only ``image_embeds`` when ``stage`` is
    None). The two methods below are what the benchmark's ideal baseline builds on.
    """

    stage: Stage | None

    def tower_tokens(self, pixel_values: Tensor) -> Tensor:
        """The tower's tokens at the feature layer, unpruned (CLS first where there is one)."""
        raise NotImplementedError

    def project(self, tokens: Tensor) -> Tensor:
        """Tower tokens -> the decoder's embedding space."""
        raise NotImplementedError

    def canvases(self, pixel_values: Tensor) -> tuple[list[tuple[str, Tensor]], Tensor]:
        """Where ``inspect`` draws one image's ([views,] 3, H, W) patches: (name, pixels [3, H, W])
        per canvas, the canvases' patches numbered one canvas after the other, row-major; and
        [views, patches] the number of each view's patch on them."""
        raise NotImplementedError

    def block_order(self, kept_index: Tensor) -> Tensor:
        """The visual block [k+c per view] as indices into the views' stage outputs (``[dominant,
        contextual]`` each) concatenated, for one image's stage-0 ``kept_index``: one view's is
        its own output."""
        return torch.arange(self.stage.total, device=kept_index.device)


class Family(ABC):
    """A model family's adapter. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # recorded in manifests, e.g. "llava-1.5"
    architecture: ClassVar[str]  # the HF class name checkpoints declare, e.g. "LlavaForConditionalGeneration"
    model_class: ClassVar[type]  # what from_pretrained is called on
    template: ClassVar[PromptTemplate]
    paper_budgets: ClassVar[tuple[str, ...]]  # the budgets the paper reports for this family (bench's default)

    # ------------------------------------------------------------ before loading
    @classmethod
    @abstractmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        """Whether ``config.json`` (as JSON) is this family's: decided by its model types only."""

    @classmethod
    @abstractmethod
    def check_config(cls, config: dict[str, Any], where: str) -> None:
        """Refuse what the family's graphs do not compute exactly, with one line naming it
        (raises :class:`CheckpointError`). Runs on the JSON, before transformers fills defaults."""

    @classmethod
    def check_processor(cls, processor_files: dict[str, Any], config: dict[str, Any], where: str) -> None:
        """Refuse a saved image processor that does not fit the tower (default: no check)."""

    # ------------------------------------------------------------- once loaded
    @staticmethod
    @abstractmethod
    def geometry(config: Any) -> VisionGeometry:
        """The patch grid of one crop, from the loaded config."""

    @staticmethod
    @abstractmethod
    def vision_unit(model: nn.Module, stage: Stage | None, ops: tuple) -> VisionUnit:
        """The family's vision unit over ``model``'s own sub-modules (weights shared)."""

    @classmethod
    def pipeline_vision(cls, model: nn.Module, schedule: Schedule, ops: tuple) -> VisionUnit:
        """The vision unit a pipeline for ``schedule`` runs: :meth:`vision_unit` on its vision
        stage; a multi-crop family also lays out the views of the schedule's grid."""
        return cls.vision_unit(model, schedule.vision, ops)

    @staticmethod
    def crop_layout(config: Any) -> dict[str, Any] | None:
        """What cutting an image into views needs at run time, as JSON (manifests record it):
        None for one view per image (the default)."""
        return None

    @staticmethod
    def crop_grid(layout: dict[str, Any] | None, image_size: tuple[int, int]) -> CropGrid | None:
        """How an image of ``image_size`` (height, width) is cut into views under ``layout``
        (:meth:`crop_layout`'s): None for one view; a multi-crop family's grid otherwise."""
        return None

    @staticmethod
    def grid_classes(layout: dict[str, Any] | None) -> list[CropGrid]:
        """Every grid :meth:`crop_grid` can give (an export has static shapes for each): none for one view."""
        return []

    @staticmethod
    @abstractmethod
    def decoder(model: nn.Module) -> DecoderParts:
        """The decoder's embedding, layers, final norm, rotary embedding and LM head."""

    @classmethod
    def conversation(cls, processor: Any, name: str | None = None) -> PromptTemplate:
        """The prompt recipe called ``name`` for a checkpoint with ``processor`` (None: the
        family's default); a family with several overrides this."""
        if name not in (None, cls.template.name):
            raise CheckpointError(f"conversation '{name}' is not one of the {cls.name} family's: use {cls.template.name}")
        return cls.template

    @staticmethod
    def max_positions(config: Any) -> tuple[int, str]:
        """(longest sequence computed exactly, what sets it)."""
        return config.text_config.max_position_embeddings, "the model's max_position_embeddings"

    @staticmethod
    def tower_parameters(model: nn.Module) -> nn.Module:
        """The module whose dtype is the vision precision (the precision policy casts it)."""
        return model.model.vision_tower


FAMILIES: dict[str, type[Family]] = {}


def register_family(family: type[Family]) -> type[Family]:
    """Class decorator: make ``family`` available to :func:`family_for_config` and by name."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"a family named {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def family_named(name: str) -> type[Family]:
    """The registered family called ``name`` (what a manifest records)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"model family '{name}' is not known to this version (known: {', '.join(FAMILIES)})") from None


def _accepting(config: dict[str, Any]) -> list[type[Family]]:
    return [family for family in FAMILIES.values() if family.accepts(config)]


def family_for_config(config: dict[str, Any], where: str) -> type[Family]:
    """The one registered family that accepts ``config.json``, checked; else one line saying why not."""
    matches = _accepting(config)
    if len(matches) > 1:
        raise CheckpointError(f"{where}: more than one model family accepts this config ({', '.join(f.name for f in matches)})")
    if not matches:
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
        kind = f"'{config.get('model_type')}'" + (f" with a '{vision['model_type']}' vision tower" if vision.get("model_type") else "")
        raise CheckpointError(
            f"{where} is a {kind} checkpoint, which no model family here handles "
            f"(known: {', '.join(f'{f.name} ({f.architecture})' for f in FAMILIES.values())}): VisionDrop Edge "
            "runs LlavaForConditionalGeneration checkpoints such as llava-hf/llava-1.5-7b-hf"
        )
    matches[0].check_config(config, where)
    return matches[0]


def family_of(model: nn.Module) -> type[Family]:
    """The family of a loaded model (its config's), without re-checking it."""
    matches = _accepting(model.config.to_dict())
    if len(matches) != 1:
        raise CheckpointError(f"{type(model).__name__} belongs to {len(matches)} registered model families, not one")
    return matches[0]


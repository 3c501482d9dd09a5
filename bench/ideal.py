"""The benchmark's ``ideal`` baseline, over any backend's public units.

The same model fed sequences of exactly each stage's size, with no scoring and no merging:
the vision unit emits the stage-0 count of tokens (its first ones) and every later decoder
group gets the first visual tokens of the stage in front of it. ``pruned / ideal - 1`` is then
the cost of pruning itself. It lives here, not in the production units: nothing deploys it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

from torch import Tensor, nn

from visiondrop_edge.families import VisionUnit
from visiondrop_edge.modules import positions_from_mask, splice_sequence
from visiondrop_edge.runtime.base import Backend, DecoderState, DelegatingBackend, PrefillOutput, VisionOutput
from visiondrop_edge.pruning import splice, visual_positions

from .clock import SpanClock


class IdealVision(nn.Module):
    """One view's vision tower and projector producing the stage-0 token count (the first tokens)."""

    def __init__(self, vision: VisionUnit):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.vision.stage is None:
            return self.vision(pixel_values)[0]
        return self.vision.project(self.vision.tower_tokens(pixel_values)[:, : self.vision.stage.total])


class IdealBaseline(DelegatingBackend):
    """``inner``'s units, driven as the ideal baseline; ``vision`` maps pixels to ideal embeddings.

    With a :attr:`clock` (the bench's, on eager backends) the splices that stand in for the
    prunes are timed: they move the sequence as a prune's output does, so the pruning's net
    cost is the prune units' time less theirs."""

    clock: SpanClock | None = None

    def __init__(self, inner: Backend, vision: Callable[[Tensor], Tensor]):
        super().__init__(inner, f"{inner.name} (ideal)")
        self.vision = vision

    def run_vision(self, pixel_values):
        """A multi-crop image's views [B, views, 3, H, W] each alone, their tokens concatenated."""
        if pixel_values.dim() == 5:
            embeds = self.vision(pixel_values.flatten(0, 1))
            return {"image_embeds": embeds.unflatten(0, pixel_values.shape[:2]).flatten(1, 2)}
        return {"image_embeds": self.vision(pixel_values)}

    def run_prune(self, stage, *inputs):
        raise NotImplementedError("the ideal baseline does not prune")

    def _encode_image(self, pixel_values: Tensor) -> VisionOutput:
        return VisionOutput(self.run_vision(pixel_values)["image_embeds"])

    def _prefill(self, input_ids: Tensor, image_embeds: Tensor, attention_mask: Tensor, image_offset: Tensor) -> PrefillOutput:
        """Each group sees its stage's size of the visual block (its first tokens, and the tokens
        a ``base``-scope stage carries), never scored; its first-layer q/k/v are projected by
        the group before on that group's sequence, as in the pruned pipeline."""
        embeds = self.run_embed(input_ids)
        hidden = splice(embeds, image_offset, image_embeds.shape[1], image_embeds.to(embeds.dtype))
        mask, position_ids = attention_mask, positions_from_mask(attention_mask)
        state, visual, seen = DecoderState(), image_embeds.shape[1], self.spec.schedule.group_tokens()
        qkv = self.run_qkv(hidden)
        for group in range(self.num_groups):
            if group > 0:
                with self.clock.span() if self.clock is not None else nullcontext():
                    # the first tokens stay, moved by the same one gather a prune's dominant ones take
                    keep, positions = seen[group], visual_positions(image_offset, seen[group])
                    hidden, qkv, mask, position_ids = splice_sequence(
                        hidden, qkv, mask, image_offset, visual, hidden[:, :0], tuple(t[:, :, :0] for t in qkv), positions
                    )
                visual = keep
            hidden, qkv, presents = self.run_group(
                group, hidden, *qkv, mask, position_ids, self.empty_past(group, hidden.shape[0])
            )
            state.caches.append(presents)
            state.masks.append(mask)
        return PrefillOutput(hidden, state, [])

"""Greedy generation over any backend, with what a user debugging pruning needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from visiondrop_edge.prompt import PromptBatch

from .base import Backend, DecoderState, StageTrace, VisionOutput


@dataclass
class GenerationResult:
    tokens: Tensor  # [B, T] generated ids (pad after a row's EOS)
    vision: VisionOutput
    stages: list[StageTrace]  # the LLM stages
    step_logits: list[Tensor] = field(default_factory=list)  # [B, vocab] per generated token

    @property
    def first_logits(self) -> Tensor:
        return self.step_logits[0]


def greedy_generate(backend: Backend, pixel_values: Tensor, prompts: PromptBatch, max_new_tokens: int) -> GenerationResult:
    """HF-style greedy decoding: stop at ``max_new_tokens`` or when every row has emitted EOS."""
    vision = backend.encode_image(pixel_values)
    prefill = backend.prefill(prompts.input_ids, vision.image_embeds, prompts.attention_mask, prompts.image_offset)
    tokens, step_logits, _ = greedy_decode(backend, prefill.logits, prefill.state, max_new_tokens)
    return GenerationResult(tokens, vision, prefill.stages, step_logits)


@dataclass
class Step:
    """One greedy step: what a stream hands on as soon as the token exists."""

    tokens: Tensor  # [B] this step's ids (pad for a row past its EOS)
    logits: Tensor  # [B, vocab] they were chosen from
    state: DecoderState  # the caches so far: every earlier token, not this one (fed back by the next step)
    last: bool  # no step follows (max_new_tokens reached, or every row has emitted EOS)


def greedy_steps(backend: Backend, logits: Tensor, state: DecoderState, max_new_tokens: int) -> Iterator[Step]:
    """Greedy decoding from the first logits, one :class:`Step` per generated token, as produced.

    A consumer that stops early (a client gone mid-stream) costs no further decode step.
    """
    spec = backend.spec
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new_tokens):
        token = torch.where(unfinished, logits.argmax(-1), torch.full_like(unfinished, spec.pad_token_id, dtype=torch.int64))
        if spec.eos_token_id is not None:
            unfinished &= token != spec.eos_token_id
        last = step == max_new_tokens - 1 or not bool(unfinished.any())  # one sync per token: loop control
        yield Step(token, logits, state, last)
        if last:
            return
        logits, state = backend.decode_step(token, state)


def greedy_decode(
    backend: Backend, logits: Tensor, state: DecoderState, max_new_tokens: int,
    on_token: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, list[Tensor], DecoderState]:
    """Greedy steps from the first logits: (tokens [B, T], each step's logits, the final state).

    The final state holds every generated token but the last one (it was never fed back).
    ``on_token`` sees each step's tokens as they are produced (streaming).
    """
    tokens, step_logits = [], []
    for step in greedy_steps(backend, logits, state, max_new_tokens):
        tokens.append(step.tokens)
        step_logits.append(step.logits)
        state = step.state
        if on_token is not None:
            on_token(step.tokens)
    generated = torch.stack(tokens, dim=1) if tokens else torch.zeros((logits.shape[0], 0), dtype=torch.int64)
    return generated, step_logits, state

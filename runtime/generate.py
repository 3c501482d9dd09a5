"""Greedy generation over any backend, with what a user debugging pruning needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from visiondrop.prompt import PromptBatch

from .base import Backend, StageTrace, VisionOutput


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
    spec = backend.spec
    vision = backend.encode_image(pixel_values)
    prefill = backend.prefill(prompts.input_ids, vision.image_embeds, prompts.attention_mask, prompts.image_offset)
    logits, state = prefill.logits, prefill.state
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, step_logits = [], []
    for step in range(max_new_tokens):
        step_logits.append(logits)
        token = torch.where(unfinished, logits.argmax(-1), torch.full_like(unfinished, spec.pad_token_id, dtype=torch.int64))
        tokens.append(token)
        if spec.eos_token_id is not None:
            unfinished &= token != spec.eos_token_id
        if step == max_new_tokens - 1 or not bool(unfinished.any()):  # one sync per token: loop control
            break
        logits, state = backend.decode_step(token, state)
    generated = torch.stack(tokens, dim=1) if tokens else torch.zeros((logits.shape[0], 0), dtype=torch.int64)
    return GenerationResult(generated, vision, prefill.stages, step_logits)

"""Many questions about one image for the price of one prefill, on any backend.

VisionDrop is text-agnostic and LLaVA's template puts the image before the question. Under
causal attention every pruning decision then depends only on the tokens before and inside
the visual block: the vision stage sees pixels, and the LLM stages score with visual queries,
which attend only to keys at or before themselves. So the pruned visual block, its hidden
states and every decoder group's (pruned) KV cache for ``[BOS, "USER: ", image]`` are computed
once per image (:meth:`Session.encode_prefix`) and any question is answered by prefilling
only its own tokens on top (:meth:`Session.answer`), with the same result as a full prefill
up to floating-point summation order. Text-guided pruning cannot do this: its choices depend
on the question.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from visiondrop_edge.errors import UserError
from visiondrop_edge.prompt import follow_up_ids, left_pad, split_prompt

from .base import Backend, DecoderState, StageTrace, VisionOutput
from .generate import Step, greedy_decode, greedy_steps


@dataclass(frozen=True)
class PrefixState:
    """One image's prefill, ready to be answered on: never modified (answers build new caches)."""

    state: DecoderState  # per group: the pruned KV cache [1, H_kv, P_g, hd] and mask [1, P_g]
    vision: VisionOutput
    stages: list[StageTrace]  # the LLM stages' choices
    prefix_ids: tuple[int, ...]  # the text before the image

    @property
    def nbytes(self) -> int:
        tensors = [t for cache in self.state.caches for t in cache] + list(self.state.masks)
        return sum(t.numel() * t.element_size() for t in tensors)


def stack_states(states: Sequence[DecoderState]) -> DecoderState:
    """Rows of several states (equal cache lengths per group) as one batch."""
    return DecoderState(
        caches=[[torch.cat(layer, dim=0) for layer in zip(*group)] for group in zip(*(s.caches for s in states))],
        masks=[torch.cat(group, dim=0) for group in zip(*(s.masks for s in states))],
    )


def row_state(state: DecoderState, row: int) -> DecoderState:
    return DecoderState([[t[row:row + 1] for t in cache] for cache in state.caches], [m[row:row + 1] for m in state.masks])


@dataclass
class PrefixCache:
    """LRU of prefix states under a byte budget; counts hits, misses and evictions."""

    budget_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def get(self, key: tuple) -> PrefixState | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: PrefixState) -> None:
        """Store ``entry`` (the least recently used go first); one larger than the budget is not kept."""
        if entry.nbytes > self.budget_bytes:
            return
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while self.nbytes > self.budget_bytes:
            self.entries.popitem(last=False)
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class Answer:
    tokens: Tensor  # [B, T] generated ids (pad after a row's EOS)
    texts: list[str]
    step_logits: list[Tensor]  # [B, vocab] per generated token
    state: DecoderState  # the caches after the answer (every generated token but the last)


class Session:
    """Prefix reuse over any backend: encode an image once, answer many questions on it.

    ``model_id`` (e.g. the model's content hash) keys the prefix cache together with the
    image's pixels, the text before the image, the backend, the schedule and the dtype.
    """

    def __init__(self, backend: Backend, processor, model_id: str, cache_bytes: int = 1 << 30):
        self.template = backend.spec.prompt_template
        if not self.template.image_first:
            raise UserError("the prompt template puts the question before the image: the question would then change "
                            "the pruning, so a prefill cannot be reused across questions")
        self.backend, self.processor, self.model_id = backend, processor, model_id
        self.cache = PrefixCache(cache_bytes)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _key(self, pixels: Tensor, prefix_ids: tuple[int, ...]) -> tuple:
        digest = hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        spec = self.backend.spec
        return (digest, prefix_ids, self.model_id, spec.schedule.describe(), spec.dtype, spec.vision_dtype, self.backend.name)

    def _prefix_ids(self) -> tuple[int, ...]:
        return split_prompt(self.tokenizer, self.template, "", self.backend.spec.image_token_id).prefix_ids

    def encode_prefix(self, pixel_values: Tensor) -> list[PrefixState]:
        """The prefix states of a batch of images [B, 3, H, W] (cached per image)."""
        prefix_ids = self._prefix_ids()
        keys = [self._key(pixel_values[i], prefix_ids) for i in range(pixel_values.shape[0])]
        found = [self.cache.get(key) for key in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        if missing:
            spec = self.backend.spec
            rows = len(missing)
            input_ids = torch.tensor([list(prefix_ids) + [spec.image_token_id] * spec.schedule.image_tokens] * rows)
            vision = self.backend.encode_image(pixel_values[missing])
            prefill = self.backend.prefill(input_ids, vision.image_embeds, torch.ones_like(input_ids),
                                           torch.full((rows,), len(prefix_ids), dtype=torch.int64))
            for row, i in enumerate(missing):
                stage = None if vision.stage is None else vision.stage.row(row)
                found[i] = PrefixState(
                    row_state(prefill.state, row), VisionOutput(vision.image_embeds[row:row + 1], stage),
                    [s.row(row) for s in prefill.stages], prefix_ids,
                )
                self.cache.put(keys[i], found[i])
        return found

    def answer(self, prefixes: Sequence[PrefixState], questions: Sequence[str], max_new_tokens: int,
               on_token: Callable[[Tensor], None] | None = None) -> Answer:
        """Row i answers ``questions[i]`` about ``prefixes[i]`` (repeat a prefix for several questions)."""
        return self.continue_with(*self._questions_on(prefixes, questions), max_new_tokens, on_token)

    def stream(self, prefix: PrefixState, question: str, max_new_tokens: int) -> Iterator[Step]:
        """:meth:`answer` for one question, one greedy step at a time as each token is produced.

        Nothing of the answer outlives the iterator: a caller that stops early (a client gone
        mid-stream) drops its caches, and the prefix is untouched.
        """
        state, ids, mask = self._questions_on([prefix], [question])
        logits, state = self.backend.extend(ids, mask, state)
        yield from greedy_steps(self.backend, logits, state, max_new_tokens)

    def _questions_on(self, prefixes: Sequence[PrefixState], questions: Sequence[str]) -> tuple[DecoderState, Tensor, Tensor]:
        """The prefixes' caches as one batch and the questions' ids, left padded, to prefill on them."""
        if len(prefixes) != len(questions):
            raise ValueError(f"{len(prefixes)} prefixes for {len(questions)} questions")
        spec = self.backend.spec
        splits = [split_prompt(self.tokenizer, self.template, q, spec.image_token_id) for q in questions]
        if any(split.prefix_ids != prefix.prefix_ids for split, prefix in zip(splits, prefixes)):
            raise UserError("the text before the image differs from the cached prefix's: it cannot be reused")
        ids, mask = left_pad([split.suffix_ids for split in splits], spec.pad_token_id)
        return stack_states([p.state for p in prefixes]), ids, mask

    def continue_with(self, state: DecoderState, ids: Tensor, mask: Tensor, max_new_tokens: int,
                      on_token: Callable[[Tensor], None] | None = None) -> Answer:
        logits, state = self.backend.extend(ids, mask, state)
        tokens, step_logits, state = greedy_decode(self.backend, logits, state, max_new_tokens, on_token)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return Answer(tokens, texts, step_logits, state)

    def chat(self, pixel_values: Tensor) -> Conversation:
        return Conversation(self, self.encode_prefix(pixel_values[:1])[0])


class Conversation:
    """A multi-turn chat about one image: each turn extends the conversation's caches."""

    def __init__(self, session: Session, prefix: PrefixState):
        self.session, self.prefix = session, prefix
        self.state: DecoderState | None = None  # after the last answer
        self.pending: list[int] = []  # the last answer's closing tokens, not yet in the caches
        self.history: list[int] = []  # every text id fed after the image (for checks and traces)

    @property
    def length(self) -> int:
        """Tokens in the conversation so far (unpruned count: what positions are bounded by)."""
        return len(self.prefix.prefix_ids) + self.session.backend.spec.schedule.image_tokens + len(self.history) + len(self.pending)

    def say(self, question: str, max_new_tokens: int, on_token: Callable[[Tensor], None] | None = None) -> Answer:
        spec = self.session.backend.spec
        if self.state is None:
            split = split_prompt(self.session.tokenizer, self.session.template, question, spec.image_token_id)
            ids, state = list(split.suffix_ids), self.prefix.state
        else:
            ids, state = self.pending + follow_up_ids(self.session.tokenizer, self.session.template, question), self.state
        row = torch.tensor([ids])
        answer = self.session.continue_with(state, row, torch.ones_like(row), max_new_tokens, on_token)
        generated = answer.tokens[0].tolist()  # one row: decoding stopped at its EOS, so all are real
        self.history += ids + generated[:-1]  # the last token was never fed back
        closing = [] if spec.eos_token_id is None or generated[-1] == spec.eos_token_id else [spec.eos_token_id]
        self.pending = generated[-1:] + closing  # the answer's end and the turn's EOS, fed with the next turn
        self.state = answer.state
        return answer

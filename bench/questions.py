"""``bench --questions-per-image``: time per answer with prefix reuse against a full prefill per question.

For each count ``n`` the same ``n`` questions about one image are answered two ways in one
run, interleaved repeat by repeat: ``full`` (one batch of ``n`` complete prompts: vision,
prefill with pruning, decode) and ``reuse`` (the image encoded and prefilled once, the ``n``
questions prefilled on top of it in one batch, decode). ``reuse_answer_only`` is the part of
``reuse`` after the prefix, the limit that the time per answer approaches as ``n`` grows.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from visiondrop_edge.runtime.base import Backend
from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.session import Session
from visiondrop_edge.prompt import build_prompts, pixel_values, random_images

QUESTION = "Question {i}: what is in this image, and what colour is it?"


def run_questions_bench(
    backend: Backend, processor, counts: tuple[int, ...], new_tokens: int, repeats: int, warmup: int = 1,
    progress: Callable[[str], None] = lambda m: None,
) -> list[dict]:
    """Rows per count: medians and minima (ms) of the time per answer, and the speed-up."""
    spec = backend.spec
    pixels = pixel_values(processor.image_processor, random_images(1, seed=0), spec.prompt_template)
    rows = []
    for count in counts:
        questions = [QUESTION.format(i=i) for i in range(count)]
        batch = build_prompts(processor.tokenizer, spec.prompt_template, questions, spec.schedule.image_tokens, spec.image_token_id, spec.pad_token_id)
        times: dict[str, list[float]] = {"full": [], "reuse": [], "reuse_answer_only": []}
        for repeat in range(warmup + repeats):
            progress(f"questions per image {count}: repeat {repeat + 1 - warmup}/{repeats}" if repeat >= warmup else
                     f"questions per image {count}: warm-up")
            start = time.perf_counter()
            greedy_generate(backend, pixels.expand(count, -1, -1, -1), batch, new_tokens)
            full = time.perf_counter() - start
            session = Session(backend, processor, "bench")  # a fresh cache: the prefix is computed in the timing
            start = time.perf_counter()
            [prefix] = session.encode_prefix(pixels)
            encoded = time.perf_counter()
            session.answer([prefix] * count, questions, new_tokens)
            done = time.perf_counter()
            if repeat >= warmup:
                times["full"].append(full * 1e3 / count)
                times["reuse"].append((done - start) * 1e3 / count)
                times["reuse_answer_only"].append((done - encoded) * 1e3 / count)
        row = {"questions_per_image": count, "new_tokens": new_tokens, "repeats": repeats}
        for name, values in times.items():
            row[f"{name}_ms_per_answer"] = {"median": statistics.median(values), "min": min(values)}
        row["speedup"] = row["full_ms_per_answer"]["median"] / row["reuse_ms_per_answer"]["median"]
        row["speedup_best"] = row["full_ms_per_answer"]["min"] / row["reuse_ms_per_answer"]["min"]
        rows.append(row)
    return rows

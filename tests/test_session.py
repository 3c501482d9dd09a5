"""Prefix reuse: one prefill per image answers any question exactly like a full prefill."""

from __future__ import annotations

import dataclasses
import pytest
import torch

from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.ort_backend import OrtBackend
from visiondrop_edge.runtime.session import PrefixCache, Session
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.families import PromptTemplate
from visiondrop_edge.errors import UserError
from visiondrop_edge.prompt import PromptBatch, build_prompts, follow_up_ids, pixel_values, random_images
from visiondrop_edge.schedule import Schedule

BUDGETS = [32, 64, 128, 192, "full"]
QUESTIONS = ["What is in this image?", "Which colour dominates?", "Describe the scene in one long sentence, please."]
NEW_TOKENS = 6
# Reused and full prefill compute the same sums in another blocking (a short query against a
# cache instead of one long sequence), so logits agree to fp32 rounding, not bit for bit:
# 1e-4 of the logits' scale, the fp32 gate validate uses per graph (measured <= 2e-6 here).
LOGIT_RELATIVE = 1e-4


@pytest.fixture(scope="module")
def backends(tiny, tmp_path_factory):
    """Per budget: the PyTorch pipeline and the exported graphs on ONNX Runtime."""
    root = tmp_path_factory.mktemp("session")
    out = {}
    for budget in BUDGETS:
        schedule = Schedule.from_budget(budget, 8, 576)
        export_artifacts(tiny, schedule, root / str(budget), ExportOptions())
        out[budget] = {"torch": TorchBackend(tiny, schedule), "ort": OrtBackend(root / str(budget), provider="cpu")}
    return out


def full_prefill(backend, tiny, pixels, questions):
    spec = backend.spec
    batch = build_prompts(tiny.tokenizer, spec.prompt_template, questions, spec.schedule.image_tokens, spec.image_token_id, spec.pad_token_id)
    return greedy_generate(backend, pixels, batch, NEW_TOKENS)


def assert_logits_close(ours, ref):
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= LOGIT_RELATIVE * scale


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("kind", ["torch", "ort"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_reused_prefix_equals_full_prefill(backends, tiny, budget, kind, images):
    backend = backends[budget][kind]
    pixels = pixel_values(tiny.processor.image_processor, random_images(images, seed=70 + images))
    session = Session(backend, tiny.processor, "tiny")
    prefixes = session.encode_prefix(pixels)
    rows = [(i, q) for i in range(images) for q in QUESTIONS]  # 3 questions per image, in one batch
    answer = session.answer([prefixes[i] for i, _ in rows], [q for _, q in rows], NEW_TOKENS)
    full = full_prefill(backend, tiny, pixels[[i for i, _ in rows]], [q for _, q in rows])
    assert torch.equal(answer.tokens, full.tokens)
    for ours, ref in zip(answer.step_logits, full.step_logits):
        assert_logits_close(ours, ref)
    for row, (i, _) in enumerate(rows):  # every stage chose the same tokens as with the question present
        if full.vision.stage is not None:
            assert torch.equal(prefixes[i].vision.stage.kept_index[0], full.vision.stage.kept_index[row])
            assert torch.equal(prefixes[i].vision.stage.target_index[0], full.vision.stage.target_index[row])
        for reused, stage in zip(prefixes[i].stages, full.stages):
            assert torch.equal(reused.kept_index[0], stage.kept_index[row])
            assert torch.equal(reused.target_index[0], stage.target_index[row])
            assert torch.equal(reused.assignment[0], stage.assignment[row])
    assert session.cache.stats()["misses"] == images


@pytest.mark.parametrize("kind", ["torch", "ort"])
def test_three_turn_chat_equals_a_full_prefill_of_the_conversation(backends, tiny, kind):
    backend = backends[64][kind]
    spec = backend.spec
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=5))
    conversation = Session(backend, tiny.processor, "tiny").chat(pixels)
    for question in QUESTIONS[:2]:
        conversation.say(question, NEW_TOKENS)
    before = list(conversation.history) + list(conversation.pending) + follow_up_ids(tiny.tokenizer, tiny.template, QUESTIONS[2])
    third = conversation.say(QUESTIONS[2], NEW_TOKENS)
    prefix = list(conversation.prefix.prefix_ids)
    ids = prefix + [spec.image_token_id] * spec.schedule.image_tokens + before
    batch = PromptBatch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.int64), torch.tensor([len(prefix)]))
    full = greedy_generate(backend, pixels, batch, NEW_TOKENS)
    assert torch.equal(third.tokens, full.tokens)
    for ours, ref in zip(third.step_logits, full.step_logits):
        assert_logits_close(ours, ref)


@pytest.mark.parametrize("kind", ["torch", "ort"])
def test_a_stream_is_the_full_prefill_answer_step_by_step(backends, tiny, kind):
    backend = backends[64][kind]
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=12))
    session = Session(backend, tiny.processor, "tiny")
    [prefix] = session.encode_prefix(pixels)
    steps = list(session.stream(prefix, QUESTIONS[2], NEW_TOKENS))
    full = full_prefill(backend, tiny, pixels, [QUESTIONS[2]])
    assert torch.equal(torch.stack([step.tokens for step in steps], dim=1), full.tokens)
    assert [step.last for step in steps] == [False] * (NEW_TOKENS - 1) + [True]  # no EOS on this model within 6 tokens
    for step, ref in zip(steps, full.step_logits):
        assert_logits_close(step.logits, ref)


def test_a_stream_closed_early_costs_no_more_steps_and_leaves_the_prefix(backends, tiny, monkeypatch):
    backend = backends[64]["torch"]
    session = Session(backend, tiny.processor, "tiny")
    [prefix] = session.encode_prefix(pixel_values(tiny.processor.image_processor, random_images(1, seed=13)))
    snapshot, cached = [t.clone() for cache in prefix.state.caches for t in cache], session.cache.stats()
    calls = []
    decode_step = backend.decode_step
    monkeypatch.setattr(backend, "decode_step", lambda *args: calls.append(1) or decode_step(*args))
    steps = session.stream(prefix, QUESTIONS[0], 100)
    next(steps), next(steps)
    steps.close()  # a client gone after two tokens
    assert len(calls) == 1  # the second token's step only
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [t for cache in prefix.state.caches for t in cache]))
    assert session.cache.stats() == cached


def test_prefix_is_immutable_and_cached(backends, tiny):
    backend = backends[128]["torch"]
    session = Session(backend, tiny.processor, "tiny")
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=9))
    [prefix] = session.encode_prefix(pixels)
    snapshot = [t.clone() for cache in prefix.state.caches for t in cache]
    session.answer([prefix, prefix], QUESTIONS[:2], NEW_TOKENS)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [t for cache in prefix.state.caches for t in cache]))
    [again] = session.encode_prefix(pixels)
    assert again is prefix and session.cache.stats()["hits"] == 1


def test_question_before_the_image_is_refused(backends, tiny, monkeypatch):
    """With the question before the image, the question changes the pruning: reuse would be wrong."""
    backend = backends[64]["torch"]
    question_first = PromptTemplate("USER: {prompt}\n<image> ASSISTANT:", tiny.template.follow_up, name="question-first")
    monkeypatch.setattr(backend, "spec", dataclasses.replace(backend.spec, prompt=question_first.to_dict()))
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=4))
    first, second = (full_prefill(backend, tiny, pixels, [q]) for q in QUESTIONS[:2])
    assert not all(torch.equal(a.kept_index, b.kept_index) for a, b in zip(first.stages, second.stages))
    with pytest.raises(UserError, match="before the image"):
        Session(backend, tiny.processor, "tiny")


def test_cache_evicts_least_recently_used_within_its_budget(backends, tiny):
    backend = backends[32]["torch"]
    pixels = pixel_values(tiny.processor.image_processor, random_images(3, seed=12))
    probe = Session(backend, tiny.processor, "tiny").encode_prefix(pixels[:1])[0]
    session = Session(backend, tiny.processor, "tiny", cache_bytes=2 * probe.nbytes)
    a, b, c = (session.encode_prefix(pixels[i:i + 1])[0] for i in range(3))
    stats = session.cache.stats()
    assert stats["entries"] == 2 and stats["evictions"] == 1 and stats["bytes"] <= stats["budget_bytes"]
    assert session.encode_prefix(pixels[2:3])[0] is c  # kept
    assert session.encode_prefix(pixels[0:1])[0] is not a  # evicted first, recomputed
    assert session.cache.stats()["bytes"] <= 2 * probe.nbytes
    tiny_cache = PrefixCache(budget_bytes=probe.nbytes - 1)
    tiny_cache.put(("k",), probe)
    assert tiny_cache.stats()["entries"] == 0  # never stored past the budget


def test_bench_questions_per_image_reports_both_ways(tmp_path):
    """The bench runs both ways in one run and writes its JSON (timings are not asserted)."""
    import json

    from click.testing import CliRunner

    import cli

    out = tmp_path / "questions.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny", "--budgets", "32", "--questions-per-image", "1,2",
                                          "--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    [budget] = json.loads(out.read_text())["budgets"]
    assert [r["questions_per_image"] for r in budget["rows"]] == [1, 2]
    for row in budget["rows"]:
        assert row["reuse_answer_only_ms_per_answer"]["median"] < row["reuse_ms_per_answer"]["median"]

"""The batched PyTorch pipeline against the naive per-sample reference and HF ``generate``.

Tolerances (fp32 on CPU): the two sides run different kernels (SDPA vs eager attention,
one-hot matmuls vs Python sums), so they agree to rounding, not bitwise. HF's own fp32 tiny
model is within 1e-5 relative of fp64 (measured), so 1e-4 absolute on O(1) embeddings and
O(5) logits is ~10x that noise floor. Kept indices and tokens must be identical.
"""

import pytest
import torch

from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.torch_backend import TorchBackend
from tests.reference import naive_generate
from visiondrop_edge.prompt import build_prompts, pad_token_id, pixel_values, random_images
from visiondrop_edge.schedule import Schedule

NEW_TOKENS = 12
TOL = {"rtol": 1e-4, "atol": 1e-4}
PROMPTS = ["What is in this picture?", "Describe the image in one long sentence, please."]  # unequal: left padding


def run_batched(tiny, budget, seed, prompts=PROMPTS):
    schedule = Schedule.from_budget(budget, tiny.config.text_config.num_hidden_layers, 576)
    backend = TorchBackend(tiny, schedule)
    pixels = pixel_values(tiny.processor.image_processor, random_images(len(prompts), seed=seed))
    batch = build_prompts(tiny.tokenizer, tiny.template, prompts, schedule.image_tokens, tiny.config.image_token_id, pad_token_id(tiny.tokenizer))
    return schedule, pixels, batch, greedy_generate(backend, pixels, batch, NEW_TOKENS)


def score_gap(scores, k):
    top = scores.double().sort(descending=True).values
    return float(top[k - 1] - top[k])


@pytest.mark.parametrize("budget", [32, 64, 128, 192])
def test_batched_pipeline_matches_naive_reference(tiny, tiny_eager, budget):
    schedule, pixels, _, result = run_batched(tiny, budget, seed=100 + budget)
    batched_stages = [result.vision.stage, *result.stages]
    for b, prompt in enumerate(PROMPTS):
        ids = tiny.tokenizer(tiny.template.first_turn.format(prompt=prompt)).input_ids
        naive = naive_generate(tiny_eager, pixels[b], ids, tiny.config.image_token_id, schedule, NEW_TOKENS, tiny.config.text_config.eos_token_id)
        assert len(naive.stages) == len(batched_stages) == 4
        for number, (stage, ours, ref) in enumerate(zip(schedule.stages, batched_stages, naive.stages)):
            gap = score_gap(ours.scores[b], stage.dominant)
            assert ours.kept_index[b].tolist() == ref.kept, f"sample {b} stage {number}: kept differ (score gap at k: {gap:.3g})"
            assert ours.target_index[b].tolist() == ref.targets, f"sample {b} stage {number}: targets differ"
        torch.testing.assert_close(result.vision.image_embeds[b], naive.image_embeds, **TOL)
        for step, (ours, ref) in enumerate(zip(result.step_logits, naive.step_logits)):
            torch.testing.assert_close(ours[b], ref, **TOL, msg=lambda m: f"step {step}: {m}")
        generated = result.tokens[b].tolist()[: len(naive.tokens)]
        assert generated == naive.tokens


def test_full_budget_reproduces_hf_generate(tiny):
    _, pixels, batch, result = run_batched(tiny, "full", seed=7)
    hf = tiny.model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
        max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    assert result.tokens.tolist() == hf.sequences[:, batch.input_ids.shape[1]:].tolist()
    for ours, theirs in zip(result.step_logits, hf.logits):
        torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("budget", [32, 128])
def test_token_counts_per_stage_follow_the_schedule(tiny, budget):
    schedule = Schedule.from_budget(budget, 8, 576)
    backend = TorchBackend(tiny, schedule)
    pixels = pixel_values(tiny.processor.image_processor, random_images(2, seed=5))
    batch = build_prompts(tiny.tokenizer, tiny.template, PROMPTS, schedule.image_tokens, tiny.config.image_token_id, pad_token_id(tiny.tokenizer))
    vision = backend.encode_image(pixels)
    assert vision.image_embeds.shape[1] == schedule.vision.total
    assert vision.stage.kept_index.shape[1] == schedule.vision.dominant
    prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    text_len = batch.input_ids.shape[1] - schedule.image_tokens
    visual = [schedule.image_tokens] + [s.total for s in schedule.llm_stages]
    for group, (start, stop) in enumerate(schedule.layer_groups()):
        caches = prefill.state.caches[group]
        assert len(caches) == 2 * (stop - start)
        assert all(c.shape[2] == text_len + visual[group] for c in caches), f"group {group}"
    for stage, trace in zip(schedule.llm_stages, prefill.stages):
        assert trace.kept_index.shape[1] == stage.dominant and trace.target_index.shape[1] == stage.contextual


def test_runs_are_deterministic(tiny):
    first = run_batched(tiny, 64, seed=11)[3]
    second = run_batched(tiny, 64, seed=11)[3]
    assert torch.equal(first.tokens, second.tokens)
    assert all(torch.equal(a, b) for a, b in zip(first.step_logits, second.step_logits))
    assert torch.equal(first.vision.image_embeds, second.vision.image_embeds)


def test_equal_length_batch_matches_single_samples(tiny):
    """Batching must not change a sample's result (no cross-talk through padding or gathers)."""
    prompts = ["What is this?", "What is this?"]
    _, _, _, batched = run_batched(tiny, 64, seed=21, prompts=prompts)
    pixels = pixel_values(tiny.processor.image_processor, random_images(2, seed=21))
    schedule = Schedule.from_budget(64, 8, 576)
    backend = TorchBackend(tiny, schedule)
    for b in range(2):
        batch = build_prompts(tiny.tokenizer, tiny.template, prompts[b:b + 1], schedule.image_tokens, tiny.config.image_token_id, pad_token_id(tiny.tokenizer))
        single = greedy_generate(backend, pixels[b:b + 1], batch, NEW_TOKENS)
        assert single.tokens[0].tolist() == batched.tokens[b].tolist()
        torch.testing.assert_close(single.step_logits[0][0], batched.step_logits[0][b], **TOL)

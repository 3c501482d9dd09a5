"""The decode cache: buffers written in place, grown by blocks, copied when shared.

The reference is Hugging Face's own model: at the full budget the pipeline is exactly HF's
forward, so every logit of a branch of the conversation must equal HF's on that branch's
whole sequence (no cache). Tolerance as in tests/test_pipeline.py: fp32 on CPU, different
kernels on each side, 1e-4 on O(5) logits is ~10x the measured fp32-vs-fp64 noise.
"""

import pytest
import torch

from visiondrop_edge.prompt import build_prompts, pad_token_id, pixel_values, random_images
from visiondrop_edge.runtime import base
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.schedule import Schedule

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def setup(tiny):
    schedule = Schedule.from_budget("full", tiny.config.text_config.num_hidden_layers, 576)
    backend = TorchBackend(tiny, schedule)
    pixels = pixel_values(tiny.processor.image_processor, random_images(1, seed=5))
    batch = build_prompts(tiny.tokenizer, tiny.template, ["What is in this picture?"], schedule.image_tokens,
                          tiny.config.image_token_id, pad_token_id(tiny.tokenizer))
    return backend, pixels, batch


def hf_last_logits(tiny, pixels, batch, tokens: list[int]) -> torch.Tensor:
    ids = torch.cat([batch.input_ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        return tiny.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits[:, -1].float()


def test_branches_of_one_state_each_match_hf(tiny, setup, monkeypatch):
    """Blocks of 4 slots: decoding crosses block boundaries (buffers grow), and two branches
    taken from the same state (the second must not overwrite the first's slots) both equal
    HF on their own token sequences."""
    monkeypatch.setattr(base, "CACHE_BLOCK", 4)
    backend, pixels, batch = setup
    vision = backend.encode_image(pixels)
    prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    trunk, root = [5], backend.decode_step(torch.tensor([5]), prefill.state)[1]
    while root.caches[0][0].shape[2] == root.masks[0].shape[1]:  # until the root's buffers have room
        trunk.append(3)
        root = backend.decode_step(torch.tensor([3]), root)[1]
    first_logits, first = backend.decode_step(torch.tensor([7]), root)  # writes into root's buffers' room
    second_logits, second = backend.decode_step(torch.tensor([9]), root)  # root again: must copy, not overwrite
    torch.testing.assert_close(first_logits, hf_last_logits(tiny, pixels, batch, trunk + [7]), **TOL)
    torch.testing.assert_close(second_logits, hf_last_logits(tiny, pixels, batch, trunk + [9]), **TOL)
    tokens, state = trunk + [7], first
    for token in (11, 13, 17, 19, 23):  # the first branch goes on past block boundaries
        logits, state = backend.decode_step(torch.tensor([token]), state)
        tokens.append(token)
        torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens), **TOL)
    logits, _ = backend.decode_step(torch.tensor([29]), second)
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, trunk + [9, 29]), **TOL)
    assert first.caches[0][0].data_ptr() == root.caches[0][0].data_ptr(), "the first branch should write in place"
    assert second.caches[0][0].data_ptr() != root.caches[0][0].data_ptr(), "the second branch should have copied"
    filled = state.masks[0].shape[1]
    assert state.caches[0][0].shape[2] == -(-filled // 4) * 4, "buffers grow by whole blocks"

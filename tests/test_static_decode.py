"""Decode on static buffers (``--cuda-graph``): the step a CUDA graph records, run here eagerly.

At the full budget the reference is Hugging Face's own forward on each branch's whole
sequence (no cache); pruned, it is the eager decode step (itself checked against HF in
test_decode_cache and against the naive reference in test_pipeline), with the tokens forced
equal so that every step compares the same inputs. Tolerance as in tests/test_decode_cache.py
(fp32 on CPU, 1e-4 on O(5) logits, ~10x the fp32 noise): the static buffers hold more masked
slots than the eager ones, which changes only the order of the attention sums.
"""

import pytest
import torch

from tests.test_decode_cache import TOL, hf_last_logits
from visiondrop_edge.prompt import build_prompts, pad_token_id, pixel_values, random_images
from visiondrop_edge.runtime import base, static_decode
from visiondrop_edge.runtime.static_decode import StaticDecoder
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.schedule import Schedule


def prefilled(tiny, budget, prompts, seed=5):
    schedule = Schedule.from_budget(budget, tiny.config.text_config.num_hidden_layers, 576)
    backend = TorchBackend(tiny, schedule)
    pixels = pixel_values(tiny.processor.image_processor, random_images(len(prompts), seed=seed))
    batch = build_prompts(tiny.tokenizer, tiny.template, prompts, schedule.image_tokens, tiny.config.image_token_id,
                          pad_token_id(tiny.tokenizer))
    vision = backend.encode_image(pixels)
    prefill = backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    return backend, pixels, batch, prefill


@pytest.fixture
def small_room(monkeypatch):
    """Bindings of 4 free slots in blocks of 4: a few steps cross a binding's end (a new one binds)."""
    monkeypatch.setattr(base, "CACHE_BLOCK", 4)
    monkeypatch.setattr(static_decode, "ROOM", 4)


def test_static_steps_and_their_branches_match_hf(tiny, small_room):
    backend, pixels, batch, prefill = prefilled(tiny, "full", ["What is in this picture?"])
    static = StaticDecoder(backend, capture=False)
    tokens, state, states = [], prefill.state, {}
    for token in (5, 3, 3, 7, 11, 13, 17, 19, 23, 29):  # past two bindings' ends
        logits, state = static.step(torch.tensor([token]), state)
        tokens.append(token)
        states[len(tokens)] = state
        torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens), **TOL)
    # an older state again: a new binding (a copy), the later states' slots untouched
    logits, _ = static.step(torch.tensor([31]), states[4])
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens[:4] + [31]), **TOL)
    logits, _ = static.step(torch.tensor([37]), state)
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens + [37]), **TOL)
    # the eager path on static states: an older one copies (it is not the newest on its buffers) ...
    logits, _ = backend.decode_step(torch.tensor([41]), states[9])
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens[:9] + [41]), **TOL)
    # ... the newest writes on in place, after which a static step from it must not overwrite that slot
    state = static.step(torch.tensor([43]), state)[1]
    tokens.append(43)
    _, eager_branch = backend.decode_step(torch.tensor([47]), state)
    logits, _ = static.step(torch.tensor([53]), state)
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens + [53]), **TOL)
    logits, _ = backend.decode_step(torch.tensor([59]), eager_branch)
    torch.testing.assert_close(logits, hf_last_logits(tiny, pixels, batch, tokens + [47, 59]), **TOL)


@pytest.mark.parametrize("budget", [32, 128])
def test_pruned_static_steps_match_eager_steps(tiny, small_room, budget):
    """Batch 2 with left padding: every group's cache has its own length and masked slots."""
    backend, _, _, prefill = prefilled(tiny, budget, ["What is in this picture?", "Describe the image in one long sentence, please."])
    static = StaticDecoder(backend, capture=False)
    eager_logits, eager_state = prefill.logits, prefill.state
    static_state = prefill.state
    for _ in range(11):
        tokens = eager_logits.argmax(-1)
        eager_logits, eager_state = backend.decode_step(tokens, eager_state)
        static_logits, static_state = static.step(tokens, static_state)
        torch.testing.assert_close(static_logits, eager_logits, **TOL)
        assert [m.tolist() for m in static_state.masks] == [m.tolist() for m in eager_state.masks]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_gpu():
    """The same step recorded as a CUDA graph and replayed, against the eager steps on the GPU."""
    from visiondrop_edge.loading import load_model

    model = load_model("tiny", device="cuda")
    eager = TorchBackend(model, Schedule.from_budget(64, model.config.text_config.num_hidden_layers, 576))
    graphed = TorchBackend(model, eager.spec.schedule, cuda_graph=True)
    pixels = pixel_values(model.processor.image_processor, random_images(2, seed=5))
    batch = build_prompts(model.tokenizer, model.template, ["What is in this picture?", "Describe it."], eager.spec.schedule.image_tokens,
                          model.config.image_token_id, pad_token_id(model.tokenizer))
    vision = eager.encode_image(pixels)
    prefill = eager.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    eager_logits, eager_state, graph_state = prefill.logits, prefill.state, prefill.state
    for _ in range(static_decode.ROOM + 3):  # past the first binding's end
        tokens = eager_logits.argmax(-1)
        eager_logits, eager_state = eager.decode_step(tokens, eager_state)
        graph_logits, graph_state = graphed.decode_step(tokens, graph_state)
        torch.testing.assert_close(graph_logits, eager_logits, **TOL)


@pytest.mark.gpu
def test_generate_with_cuda_graph_answers_as_eager_on_gpu(tmp_path):
    """The CLI's ``generate --cuda-graph`` opens a recording backend and answers as the eager CLI.

    The graphed steps' logits differ from the eager ones by the attention sums' order (TOL), so
    a token may flip only where the eager logits' top two are that close: the answers are
    compared up to the first such step (found on an eager run of the same request)."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from visiondrop_edge import cli
    from visiondrop_edge.prompt import load_images
    from visiondrop_edge.runtime.generate import greedy_generate

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((240, 320, 3)) * 255).astype("uint8")).save(image)
    args = ["generate", "--image", image, "--prompt", "What is in this picture?", "--budget", "64", "--device", "cuda",
            "--max-new-tokens", "24", "--json", "-"]
    answers = {}
    for flags in ([], ["--cuda-graph"]):
        result = CliRunner().invoke(cli.cli, [str(a) for a in args + flags])
        assert result.exit_code == 0, result.output
        answers[bool(flags)] = json.loads(result.stdout)["generated_ids"][0]
    backend, processor, _, _ = cli.open_backend("torch", "tiny", None, None, "auto", "64", None, "cuda", cuda_graph=True)
    assert backend.static_decoder is not None and backend.static_decoder.capture and backend.replays is not None
    eager = TorchBackend(backend.loaded, backend.spec.schedule)
    pictures = load_images([image])
    batch = build_prompts(processor.tokenizer, eager.spec.prompt_template, ["What is in this picture?"], eager.spec.schedule.image_tokens,
                          eager.spec.image_token_id, eager.spec.pad_token_id)
    result = greedy_generate(eager, pixel_values(processor.image_processor, pictures, eager.spec.prompt_template), batch, 24)
    assert result.tokens[0].tolist() == answers[False]  # the same request as the CLI's
    margins = [float(top[0] - top[1]) for top in (logits[0].topk(2).values for logits in result.step_logits)]
    decided = next((i for i, margin in enumerate(margins) if margin < 10 * TOL["atol"]), len(margins))
    assert decided >= 8, margins  # enough clearly decided steps for the comparison to mean something
    assert answers[True][:decided] == answers[False][:decided]

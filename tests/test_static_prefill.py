"""Vision encodes and prefills as recorded calls (``--cuda-graph``, runtime/static_prefill.py).

A CUDA graph replays kernels on fixed buffers, so it is only correct if nothing in the call
reads a device value on the host (a ``.item()``, a ``bool(tensor)``, a data-dependent
shape): under a capture such a read fails or, worse, freezes the value seen while recording.
The first test runs the requests under PyTorch's fake tensors, which have no values, so any
such read raises; a control shows that it does. The others check the replay path: on CPU
(``capture=False``: static buffers refilled, outputs copied) bit for bit against the eager
requests, which run the same ops in the same order on the same inputs, and on a GPU the
recorded replays against the eager GPU requests, to the fp32 tolerance of
tests/test_decode_cache.py (the cuBLAS kernels a capture picks may sum in another order).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from tests.test_decode_cache import TOL
from visiondrop_edge.bench.ideal import IdealBaseline, IdealVision
from visiondrop_edge.bench.run import bench_images
from visiondrop_edge.prompt import build_prompts, image_sizes, pad_token_id, pixel_values
from visiondrop_edge.pruning import REFERENCE_OPS
from visiondrop_edge.runtime import static_prefill
from visiondrop_edge.runtime.static_prefill import GraphedCalls
from visiondrop_edge.runtime.torch_backend import TorchBackend

PROMPTS = ["What is in this picture?", "Describe the image in one long sentence, please."]


def request_inputs(loaded, backend, seed):
    images = bench_images(backend.spec, len(PROMPTS), seed)  # for a multi-crop model, images filling its grid
    bound = backend.for_images(image_sizes(images, backend.spec.prompt_template))
    pixels = pixel_values(loaded.processor.image_processor, images, bound.spec.prompt_template)
    batch = build_prompts(loaded.tokenizer, bound.spec.prompt_template, PROMPTS, bound.spec.schedule.image_tokens,
                          bound.spec.image_token_id, pad_token_id(loaded.tokenizer))
    return bound, pixels, batch


def request(backend, pixels, batch):
    vision = backend.encode_image(pixels)
    return vision, backend.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)


def leaves(value):
    """Every tensor in a request's outputs, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in leaves(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in leaves(getattr(value, name))]
    return []


@pytest.fixture(scope="module")
def request_model(tiny):
    """Built-in models by name, each loaded once for this module."""
    from visiondrop_edge.loading import load_model

    models = {"tiny": tiny}

    def get(name):
        if name not in models:
            models[name] = load_model(name)
        return models[name]

    return get


@pytest.mark.parametrize("model, budget", [("tiny", 64), ("tiny", "full"), ("tiny-next", 160)])
def test_requests_make_no_host_round_trip(request_model, model, budget):
    loaded = request_model(model)
    backend = TorchBackend(loaded, loaded.schedule(budget))
    ideal = IdealBaseline(backend, torch.inference_mode()(IdealVision(loaded.family.vision_unit(loaded.model, backend.spec.schedule.vision,
                                                                                                 REFERENCE_OPS)).eval()))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with pytest.raises(DataDependentOutputException):  # the control: a host read of a fake value raises
        with mode:
            mode.from_tensor(torch.ones(2)).sum().item()
    variants = [backend] if backend.spec.schedule.is_full else [backend, ideal]
    for variant in variants:
        bound, pixels, batch = request_inputs(loaded, variant, seed=1)
        with mode:
            fake = [mode.from_tensor(t) for t in (pixels, batch.input_ids, batch.attention_mask, batch.image_offset)]
            vision = bound.encode_image(fake[0])
            prefill = bound.prefill(fake[1], vision.image_embeds, fake[2], fake[3])
            bound.decode_step(prefill.logits.argmax(-1), prefill.state)


@pytest.mark.parametrize("budget", [64, "full"])
def test_replayed_requests_match_eager_ones(tiny, budget):
    """First sight eager, second recorded, then replays: each on new inputs of the same shape."""
    eager = TorchBackend(tiny, tiny.schedule(budget))
    replayed = TorchBackend(tiny, eager.spec.schedule)
    replayed.replays = GraphedCalls(capture=False)
    outputs = []
    for seed in (1, 2, 3):
        bound, pixels, batch = request_inputs(tiny, eager, seed)
        outputs.append((request(bound, pixels, batch), request(replayed, pixels, batch)))
    assert len(replayed.replays._recordings) == 2  # vision and prefill, recorded at their second sight
    for expected, got in outputs:  # every returned output still holds its own request's values
        assert [t.shape for t in leaves(got)] == [t.shape for t in leaves(expected)]
        assert all(torch.equal(a, b) for a, b in zip(leaves(got), leaves(expected), strict=True))
    # a decode step from a replayed prefill's state
    (_, expected), (_, got) = outputs[-1]
    tokens = expected.logits.argmax(-1)
    assert torch.equal(replayed.decode_step(tokens, got.state)[0], eager.decode_step(tokens, expected.state)[0])


def test_recordings_are_bounded_and_shapes_seen_once_stay_eager(monkeypatch):
    calls = []

    def double(x):
        calls.append(x.shape[0])
        return {"y": x * 2}

    monkeypatch.setattr(static_prefill, "MAX_GRAPHS", 2)
    graphs = GraphedCalls(capture=False)
    for n in (1, 2, 3, 1, 2, 3, 3):
        x = torch.arange(float(n))
        assert torch.equal(graphs("double", None, double, x)["y"], x * 2)
    assert len(graphs._recordings) == 2 and list(k[2][0][0][0] for k in graphs._recordings) == [2, 3]
    assert calls == [1, 2, 3, 1, 2, 3, 3]  # capture=False runs every call (on its buffers once recorded)


def test_copied_outputs_share_no_storage_with_the_graphs_buffers(tiny):
    """A replay returns ``copied(outputs)``: equal values, the same types, none of the buffers."""
    backend = TorchBackend(tiny, tiny.schedule(64))
    outputs = request(*request_inputs(tiny, backend, seed=1))
    copy = static_prefill.copied(outputs)
    assert type(copy[1].state) is type(outputs[1].state) and type(copy[1].stages[0]) is type(outputs[1].stages[0])
    pairs = list(zip(leaves(copy), leaves(outputs), strict=True))
    assert pairs and all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [64, "full"])
def test_recorded_requests_match_eager_ones_on_gpu(budget):
    from visiondrop_edge.loading import load_model

    model = load_model("tiny", device="cuda")
    eager = TorchBackend(model, model.schedule(budget))
    graphed = TorchBackend(model, eager.spec.schedule, cuda_graph=True)
    outputs = []
    for seed in (1, 2, 3, 4):  # eager, recorded, replayed, replayed
        bound, pixels, batch = request_inputs(model, eager, seed)
        outputs.append((request(bound, pixels, batch), request(graphed, pixels, batch)))
    assert len(graphed.replays._recordings) == 2 and all(r.graph is not None for r in graphed.replays._recordings.values())
    for expected, got in outputs:  # the earlier replays' outputs were not overwritten by the later ones
        for a, b in zip(leaves(got), leaves(expected), strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, **TOL)
            else:
                assert torch.equal(a, b)
    (_, expected), (_, got) = outputs[-1]
    tokens = expected.logits.argmax(-1)
    torch.testing.assert_close(graphed.decode_step(tokens, got.state)[0], eager.decode_step(tokens, expected.state)[0], **TOL)

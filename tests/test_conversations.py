"""Prompt recipes per family: the checkpoint's chat template, and LLaVA-1.5's original evaluation.

References are independent of the code under test: HF's own ``apply_chat_template`` for the
checkpoint recipe, and a restatement of LLaVA's ``tokenizer_image_token`` and
``expand2square`` (llava/mm_utils.py) for ``llava_v1``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from visiondrop_edge.errors import CheckpointError, SettingError
from visiondrop_edge.families.llava import VICUNA_V1_SYSTEM, Llava15
from visiondrop_edge.prompt import build_prompts, pad_to_square, pixel_values, split_prompt

# The chat template llava-hf ships with llava-1.5 checkpoints (images first, then the text).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUESTION = "What is in the picture?"


def llava_tokenizer_image_token(tokenizer, prompt: str, image_token_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token, restated: chunks around <image>, later chunks lose the BOS."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(image_token_id)
        ids.extend(chunk[offset:])
    return ids


@pytest.fixture
def chat_processor(tiny):
    processor = copy.deepcopy(tiny.processor)
    processor.chat_template = LLAVA_HF_CHAT_TEMPLATE
    return processor


def test_default_is_the_checkpoint_template_where_there_is_one(tiny, chat_processor):
    assert Llava15.conversation(tiny.processor).name == "plain"  # the built-in processor has none
    template = Llava15.conversation(chat_processor)
    assert template.name == "checkpoint" and template.image_first
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = chat_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_id = tiny.config.image_token_id
    batch = build_prompts(tiny.tokenizer, template, [QUESTION], 3, image_id, tiny.tokenizer.pad_token_id)
    expected = tiny.tokenizer(rendered).input_ids
    at = expected.index(image_id)
    assert batch.input_ids[0].tolist() == expected[:at] + [image_id] * 3 + expected[at + 1:]


def test_a_later_turn_follows_the_template(chat_processor):
    template = Llava15.conversation(chat_processor)
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
             {"role": "user", "content": [{"type": "text", "text": "Q2"}]}]
    rendered = chat_processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("A1" + template.follow_up.format(prompt="Q2"))


def test_unknown_or_unavailable_conversations_are_refused(tiny):
    with pytest.raises(SettingError, match="no chat_template: use conversation plain"):
        Llava15.conversation(tiny.processor, "checkpoint")
    with pytest.raises(CheckpointError, match="unknown conversation 'vicuna'"):
        Llava15.conversation(tiny.processor, "vicuna")


@pytest.mark.parametrize("question", [QUESTION, "describe\nit", " leading space"])
def test_llava_v1_tokenises_like_the_original_evaluation(tiny, question):
    template = Llava15.conversation(tiny.processor, "llava_v1")
    image_id = tiny.config.image_token_id
    prompt = f"{VICUNA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    split = split_prompt(tiny.tokenizer, template, question, image_id)
    assert list(split.prefix_ids) + [image_id] + list(split.suffix_ids) == llava_tokenizer_image_token(
        tiny.tokenizer, prompt, image_id)


def test_llava_v1_pads_images_to_a_square_in_the_mean_colour(tiny):
    processor = tiny.processor.image_processor
    colour = tuple(int(x * 255) for x in processor.image_mean)
    wide = Image.fromarray(np.full((10, 30, 3), 200, dtype=np.uint8))
    square = np.asarray(pad_to_square(wide, colour))
    assert square.shape == (30, 30, 3)
    assert (square[:10] == colour).all() and (square[20:] == colour).all() and (square[10:20] == 200).all()
    template = Llava15.conversation(tiny.processor, "llava_v1")
    plain = Llava15.conversation(tiny.processor, "plain")
    assert (pixel_values(processor, [wide], template) == pixel_values(processor, [Image.fromarray(square)])).all()
    assert not (pixel_values(processor, [wide], template) == pixel_values(processor, [wide], plain)).all()


class PrefixingTokenizer:
    """Like SentencePiece's dummy prefix: every call starts its text with a word-boundary token
    (here 2), so chunked and whole-string tokenisation differ, as they do for LLaMA."""

    bos_token_id, boundary, image = 1, 2, 3

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self.boundary] + [self.image if part == "<image>" else 10 + ord(part) for part in _parts(text)]
        return type("Encoding", (), {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids})()


def _parts(text: str) -> list[str]:
    head, sep, tail = text.partition("<image>")
    return list(head) + ([sep] + _parts(tail) if sep else [])


def test_llava_v1_chunks_where_a_tokenizer_can_tell(tiny):
    tokenizer = PrefixingTokenizer()
    llava_v1, plain = (Llava15.conversation(tiny.processor, name) for name in ("llava_v1", "plain"))
    ids = llava_tokenizer_image_token(tokenizer, llava_v1.first_turn.format(prompt="hi"), tokenizer.image)
    split = split_prompt(tokenizer, llava_v1, "hi", tokenizer.image)
    assert list(split.prefix_ids) + [tokenizer.image] + list(split.suffix_ids) == ids
    assert split.suffix_ids[0] == tokenizer.boundary  # the question's chunk starts a new word
    whole = split_prompt(tokenizer, plain, "hi", tokenizer.image)
    assert whole.suffix_ids[0] != tokenizer.boundary


def test_generate_traces_the_exact_inputs_of_its_conversation(tiny, tmp_path):
    import json

    from click.testing import CliRunner

    from visiondrop_edge import cli

    image = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 80, 3), 90, dtype=np.uint8)).save(image)
    trace = tmp_path / "trace.json"
    result = CliRunner().invoke(cli.cli, ["generate", "--image", str(image), "--prompt", QUESTION, "--budget", "32",
                                          "--max-new-tokens", "2", "--conversation", "llava_v1", "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    data = json.loads(trace.read_text())
    template = Llava15.conversation(tiny.processor, "llava_v1")
    split = split_prompt(tiny.tokenizer, template, QUESTION, tiny.config.image_token_id)
    image_tokens = 48  # budget 32: 42+6 vision tokens
    assert data["conversation"] == "llava_v1"
    assert data["input_ids"][0] == list(split.prefix_ids) + [tiny.config.image_token_id] * image_tokens + list(split.suffix_ids)
    import hashlib

    pixels = pixel_values(tiny.processor.image_processor, [Image.open(image).convert("RGB")], template)
    assert data["pixel_values_sha256"] == [hashlib.sha256(pixels[0].contiguous().numpy().tobytes()).hexdigest()]


def test_inspect_and_chat_take_the_conversation(tiny, tmp_path):
    """`inspect --conversation llava_v1` pads a wide image to a square in the mean colour before
    the vision stage: its stage-0 picks equal those of the same image padded here by hand (with
    the plain recipe, which does not pad), and differ from the unpadded image's. `chat` takes the
    option too, and refuses it on an artifact folder, whose manifest fixed the recipe."""
    import json

    from click.testing import CliRunner

    from visiondrop_edge import cli

    rng = np.random.default_rng(7)
    wide = rng.integers(0, 256, size=(48, 112, 3), dtype=np.uint8)
    colour = np.array([int(x * 255) for x in tiny.processor.image_processor.image_mean], dtype=np.uint8)
    square = np.empty((112, 112, 3), dtype=np.uint8)
    square[:] = colour
    square[32:80] = wide  # centred vertically: (112 - 48) / 2 rows above
    paths = {}
    for name, pixels in (("wide", wide), ("square", square)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(pixels).save(paths[name])

    def vision_stage(image, conversation):
        out = tmp_path / f"{image}-{conversation}.json"
        result = CliRunner().invoke(cli.cli, ["inspect", "--image", str(paths[image]), "--budget", "64",
                                              "--conversation", conversation, "--json", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["stages"][0]

    padded = vision_stage("wide", "llava_v1")
    assert padded == vision_stage("square", "plain")
    assert padded["dominant"] != vision_stage("wide", "plain")["dominant"]
    chat = CliRunner().invoke(cli.cli, ["chat", "--image", str(paths["wide"]), "--budget", "64", "--conversation", "llava_v1",
                                        "--max-new-tokens", "2"], input="what is it?\n\n")
    assert chat.exit_code == 0 and "ask away" in chat.output, chat.output
    refused = CliRunner().invoke(cli.cli, ["chat", "--artifacts", str(tmp_path), "--image", str(paths["wide"]),
                                           "--conversation", "llava_v1"], input="\n")
    assert refused.exit_code == 2 and "--conversation is fixed at export time" in refused.output


def test_bench_measures_the_prompt_of_its_conversation(tiny, tmp_path):
    """`bench --conversation llava_v1` times the original evaluation's prompt: as many text tokens
    as LLaVA's own tokenisation of it gives, and it records the recipe."""
    import json

    from click.testing import CliRunner

    from visiondrop_edge import cli
    from visiondrop_edge.bench.run import PROMPT

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny", "--backend", "torch", "--budgets", "64", "--batch", "1",
                                          "--max-new-tokens", "1", "--warmup", "0", "--repeats", "1",
                                          "--conversation", "llava_v1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    image_id = tiny.config.image_token_id
    expected = llava_tokenizer_image_token(tiny.tokenizer, f"{VICUNA_V1_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:", image_id)
    assert report["config"]["conversation"] == "llava_v1"
    assert {row["text_tokens"] for row in report["results"]} == {len(expected) - 1}

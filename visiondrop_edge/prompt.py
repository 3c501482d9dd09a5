"""Prompts and images in, model inputs out, in the model family's conversation template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import CheckpointError, InputError
from .families import PromptTemplate


@dataclass
class PromptBatch:
    """Left-padded token ids with ``image_tokens`` placeholders starting at ``image_offset``."""

    input_ids: Tensor  # [B, S] int64
    attention_mask: Tensor  # [B, S] int64, 0 on the left padding
    image_offset: Tensor  # [B] int64


@dataclass(frozen=True)
class SplitPrompt:
    """A templated prompt cut at its image: what comes before it does not depend on the question."""

    prefix_ids: tuple[int, ...]  # BOS and the template's text before the image
    suffix_ids: tuple[int, ...]  # the question and the answer cue


def _check_question(prompt: str, template: PromptTemplate) -> None:
    if template.image_placeholder in prompt:
        raise InputError(f"the prompt must not contain '{template.image_placeholder}': the image is placed by the template")


def split_prompt(tokenizer, template: PromptTemplate, prompt: str, image_token_id: int) -> SplitPrompt:
    """Tokenise ``prompt`` in the template and cut it at the image token.

    A ``chunked`` template tokenises the text before and after the image separately, as
    LLaVA's ``tokenizer_image_token`` does (the second chunk loses its BOS): SentencePiece
    then starts the question with its own word boundary, which one string would not.
    """
    _check_question(prompt, template)
    text = template.first_turn.format(prompt=prompt)
    if template.chunked:
        before, after = (tokenizer(chunk).input_ids for chunk in text.split(template.image_placeholder))
        bos = tokenizer.bos_token_id
        skip = 1 if bos is not None and before[:1] == [bos] else 0  # what LLaVA drops from every later chunk
        return SplitPrompt(tuple(before), tuple(after[skip:]))
    ids = tokenizer(text).input_ids
    if ids.count(image_token_id) != 1:
        raise CheckpointError(
            f"the tokenizer does not map '{template.image_placeholder}' to the model's image token id {image_token_id}: "
            "use the tokenizer saved with the checkpoint"
        )
    at = ids.index(image_token_id)
    return SplitPrompt(tuple(ids[:at]), tuple(ids[at + 1:]))


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (LLaMA tokenizers may define no pad)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids [B, S] and their attention mask (0 on the padding)."""
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(list(ids))
            attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


def build_prompts(
    tokenizer, template: PromptTemplate, prompts: Sequence[str], image_tokens: int, image_token_id: int, pad_token_id: int
) -> PromptBatch:
    """Tokenise each prompt in the template and expand its image placeholder to ``image_tokens`` ids."""
    splits = [split_prompt(tokenizer, template, prompt, image_token_id) for prompt in prompts]
    rows = [list(p.prefix_ids) + [image_token_id] * image_tokens + list(p.suffix_ids) for p in splits]
    input_ids, attention_mask = left_pad(rows, pad_token_id)
    pad = input_ids.shape[1] - torch.tensor([len(ids) for ids in rows])
    offsets = pad + torch.tensor([len(p.prefix_ids) for p in splits])
    return PromptBatch(input_ids, attention_mask, offsets.to(torch.int64))


def follow_up_ids(tokenizer, template: PromptTemplate, prompt: str) -> list[int]:
    """A later chat turn's ids (no BOS: it continues the conversation)."""
    _check_question(prompt, template)
    return tokenizer(template.follow_up.format(prompt=prompt), add_special_tokens=False).input_ids


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Read images the way transformers' ``load_image`` does (EXIF orientation applied, RGB),
    with 16-bit greyscale scaled to 8 bits (PIL's ``convert`` would clip it to white) and
    PIL's decompression-bomb limit enforced."""
    images = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise InputError(f"image {path} is a folder, not an image file: pass the path of a PNG or JPEG file")
        if not path.is_file():
            raise InputError(f"image {path} does not exist: pass the path of a PNG or JPEG file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    images.append(_to_rgb(ImageOps.exif_transpose(image)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(
                f"image {path} is too large ({str(exc).split(',')[0]}; the limit is {Image.MAX_IMAGE_PIXELS:,} pixels, "
                "PIL's decompression-bomb guard): downscale it first"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"cannot read image {path} ({exc.__class__.__name__}): pass a PNG or JPEG file") from None
    return images


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            raise ValueError(f"{image.mode} pixel values outside 0..65535")
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    return image.convert("RGB")


def check_length(batch: PromptBatch, max_new_tokens: int, limit: int, limit_name: str) -> None:
    """Refuse a prompt that, with the answer, would run past the positions the model (or the
    artifacts) support, before any work is done."""
    needed = batch.input_ids.shape[1] + max_new_tokens
    if needed > limit:
        answer = f" and up to {max_new_tokens} new tokens: {needed} positions," if max_new_tokens else ","
        raise InputError(
            f"the prompt takes {batch.input_ids.shape[1]} tokens (image included){answer} more than the {limit} of "
            f"{limit_name}; shorten the prompt" + (" or lower --max-new-tokens" if max_new_tokens else "")
        )


def random_images(count: int, seed: int, size: int = 336) -> list[Image.Image]:
    """Fresh random RGB images (smooth blobs plus noise, so attention has structure)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, size=(6, 6, 3))
        smooth = np.kron(coarse, np.ones((size // 6 + 1, size // 6 + 1, 1)))[:size, :size]
        noise = rng.normal(0, 40, size=(size, size, 3))
        images.append(Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)))
    return images


def pad_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of ``colour`` (LLaVA-1.5's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_sizes(images: Sequence[Image.Image], template: PromptTemplate | None = None) -> list[tuple[int, int]]:
    """(height, width) of each image as the processor gets it (a ``pad_to_square`` template's
    squares): what a multi-crop model's grid is chosen from (``Backend.for_images``)."""
    square = template is not None and template.pad_to_square
    return [(max(image.size),) * 2 if square else (image.height, image.width) for image in images]


def pixel_values(image_processor, images: Sequence[Image.Image], template: PromptTemplate | None = None) -> Tensor:
    """The processor's pixels; a ``pad_to_square`` template first pads in the processor's mean colour."""
    if template is not None and template.pad_to_square:
        colour = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [pad_to_square(image, colour) for image in images]
    return image_processor(list(images), return_tensors="pt")["pixel_values"]

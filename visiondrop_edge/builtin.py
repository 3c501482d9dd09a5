"""Built-in LLaVA-1.5-shaped models with seeded random weights (nothing is downloaded).

``tiny`` is what CI runs on; ``small`` gives a 2-core CPU enough real work for timings to
mean something; ``llava-1.5-7b-shape`` has the real 7B shapes for GPU timing. Each is a real
``LlavaForConditionalGeneration`` with a real offline tokenizer (byte-level BPE with
``<image>``) and a CLIP image processor, written with ``save_pretrained`` and read back with
``from_pretrained`` exactly like a downloaded checkpoint. ``tiny-next`` is the tiny model as a
``LlavaNextForConditionalGeneration`` (multi-crop "anyres" images) with a LLaVA-NeXT processor.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

# Bump when the weights or tokenizer of a preset change, so stale caches are rebuilt.
BUILTIN_VERSION = 1
SEED = 20260628
# A saved preset carries this file: the recipe it was built from and every file's sha256,
# so a cache that was altered or built by another version is detected and rebuilt.
BUILTIN_MARKER = "visiondrop-builtin.json"
BUILTIN_FORMAT = "visiondrop-edge/builtin"

IMAGE_SIZE = 336
PATCH_SIZE = 14
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# LLaVA-NeXT's default (height, width) resolutions: every grid class, 1x2, 2x1, 2x2, 3x1 and 1x3 crops.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Preset:
    """Sizes of a built-in model; everything else follows LLaVA-1.5."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int | None = None  # None: the byte-level tokenizer's size
    pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT's (height, width) grid pinpoints; None: LLaVA-1.5


PRESETS: dict[str, Preset] = {
    # CI model: 576 patches, an 8-layer decoder of width 64 (GQA: 4 heads, 2 KV heads).
    "tiny": Preset(64, 128, 3, 4, 64, 128, 8, 4, 2),
    # CPU timing model: 576 patches, a 12-layer decoder of width 1024.
    "small": Preset(256, 1024, 4, 4, 1024, 2816, 12, 16, 16),
    # LLaVA-1.5-7B's shapes with random weights, for GPU timing.
    "llava-1.5-7b-shape": Preset(1024, 4096, 24, 16, 4096, 11008, 32, 32, 32, vocab_size=32064),
    # CI model for multi-crop images: the tiny sizes as a LLaVA-NeXT with the default pinpoints.
    "tiny-next": Preset(64, 128, 3, 4, 64, 128, 8, 4, 2, pinpoints=NEXT_PINPOINTS),
    # The CPU timing and GPU timing models as LLaVA-NeXT (llava-v1.6-vicuna-7b's shapes).
    "small-next": Preset(256, 1024, 4, 4, 1024, 2816, 12, 16, 16, pinpoints=NEXT_PINPOINTS),
    "llava-next-7b-shape": Preset(1024, 4096, 24, 16, 4096, 11008, 32, 32, 32, vocab_size=32064, pinpoints=NEXT_PINPOINTS),
}


def recipe_hash(name: str) -> str:
    """sha256 of everything a preset's files are made from (sizes, seed, version, geometry)."""
    sizes = asdict(PRESETS[name])
    if sizes["pinpoints"] is None:
        del sizes["pinpoints"]  # LLaVA-1.5 presets hash as before the field existed: their caches stay valid
    recipe = {"preset": name, "sizes": sizes, "seed": SEED, "version": BUILTIN_VERSION,
              "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "special_tokens": SPECIAL_TOKENS}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no merges) with LLaMA's specials and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


CROP = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
PROCESSOR = {"patch_size": PATCH_SIZE, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def build_processor() -> LlavaProcessor:
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**CROP), tokenizer=build_tokenizer(), **PROCESSOR)


def build_next_processor(pinpoints: tuple[tuple[int, int], ...]) -> LlavaNextProcessor:
    """LLaVA-NeXT's processor: 336 px crops of the image resized and padded to the best pinpoint."""
    image_processor = LlavaNextImageProcessorPil(**CROP, image_grid_pinpoints=[list(p) for p in pinpoints])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), **PROCESSOR)


def build_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig | LlavaNextConfig:
    vocab_size = preset.vocab_size or len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=preset.vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if preset.pinpoints is not None:
        return LlavaNextConfig(**common, image_grid_pinpoints=[list(p) for p in preset.pinpoints])
    return LlavaConfig(**common)


def _param_std(name: str, param: torch.Tensor) -> tuple[float, float]:
    """(mean, std) for one parameter.

    Linear weights get variance 1/fan_in so activations stay O(1) at every depth, and the
    q/k projections gain 3x (vision) / 2x (decoder) so that attention is peaked rather than
    uniform: top-k then has clear winners and no near-ties (measured: the log-score gap at
    every k-th boundary stays above 1e-4 on random images), while the decoder stays well
    conditioned (fp32 logits within 1e-5 relative of fp64). Norm weights are jittered
    around 1 so a forgotten norm weight shows up in the parity tests.
    """
    if param.dim() == 1:
        if "norm" in name and name.endswith("weight"):
            return 1.0, 0.1
        if name.endswith(("class_embedding", "image_newline")):  # embeddings, like the tokens beside them
            return 0.0, 1.0
        return 0.0, 0.02  # biases
    if "embed_tokens" in name or "position_embedding" in name:
        return 0.0, 1.0
    fan_in = math.prod(param.shape[1:])
    gain = 1.0
    if "q_proj" in name or "k_proj" in name:
        gain = 3.0 if "vision_tower" in name else 2.0
    return 0.0, gain / math.sqrt(fan_in)


@torch.no_grad()
def init_seeded(model: nn.Module, seed: int = SEED) -> None:
    """Deterministic weights: each parameter draws from a generator seeded by its name."""
    for name, param in model.named_parameters():
        digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        generator = torch.Generator(device=param.device).manual_seed(digest)
        mean, std = _param_std(name, param)
        values = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
        param.copy_(values * std + mean)


def build_model(name: str, device: str | torch.device = "cpu") -> tuple[nn.Module, LlavaProcessor | LlavaNextProcessor]:
    """A preset's model (fp32, seeded weights) and processor, built in memory."""
    preset = PRESETS[name]
    processor = build_processor() if preset.pinpoints is None else build_next_processor(preset.pinpoints)
    config = build_config(preset, processor.tokenizer)
    model_class = LlavaForConditionalGeneration if preset.pinpoints is None else LlavaNextForConditionalGeneration
    with torch.device(device):
        model = model_class(config)
    init_seeded(model)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), processor

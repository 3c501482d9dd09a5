"""LLaVA-1.5 (``LlavaForConditionalGeneration``, CLIP ViT tower with CLS, Llama/Mistral decoder).

The stage-0 prune is VisionDrop's reference rule: the CLS query's attention in the feature
layer ranks the patches and CLS is always kept (see ``../shared/VISIONDROP.md``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration

from visiondrop_edge import pruning
from visiondrop_edge.errors import CheckpointError, SettingError
from visiondrop_edge.schedule import Stage

from .base import DecoderParts, Family, PromptTemplate, VisionGeometry, VisionUnit, register_family

SUPPORTED_DECODERS = ("llama", "mistral")

# What llava-hf's own chat template renders for one image and one question.
PLAIN = PromptTemplate("USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:", name="plain")
# The original LLaVA-1.5 evaluation (conv_vicuna_v1, tokenizer_image_token, image_aspect_ratio=pad).
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1 = PromptTemplate(VICUNA_V1_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:", "USER: {prompt} ASSISTANT:",
                          name="llava_v1", chunked=True, pad_to_square=True)
CONVERSATIONS = {template.name: template for template in (PLAIN, LLAVA_V1)}
CHECKPOINT = "checkpoint"


def rendered_template(processor: Any, placeholder: str = "<image>") -> PromptTemplate:
    """The checkpoint's own ``chat_template`` as a template: one image then the question, and a
    later turn (the text its template puts after an answer, less the EOS the runtime feeds)."""
    question, answer, follow = "\x00Q\x00", "\x00A\x00", "\x00F\x00"  # text no template produces

    def render(messages: list) -> str:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text.replace("{", "{{").replace("}", "}}")

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    first = render(turn)
    later = render(turn + [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                           {"role": "user", "content": [{"type": "text", "text": follow}]}]).split(answer, 1)[1]
    eos = getattr(processor.tokenizer, "eos_token", None)
    later = later[len(eos):] if eos and later.startswith(eos) else later
    if first.count(placeholder) != 1 or question not in first or follow not in later:
        raise CheckpointError.naming("the checkpoint's chat_template does not render one {placeholder} and the question: "
                                     "use {conversation} plain or llava_v1", placeholder=placeholder)
    return PromptTemplate(first.replace(question, "{prompt}"), later.replace(follow, "{prompt}"), name=CHECKPOINT,
                          image_placeholder=placeholder)


def _integer(config: dict, section: str | None, key: str, default: int, where: str) -> int:
    """``config[section][key]`` (or ``config[key]``), which must be an integer if present."""
    value = (config[section] if section else config).get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        name = f"{section}.{key}" if section else key
        raise CheckpointError(f"{where}: config.json's {name} must be an integer (got {value!r})")
    return value


def check_llava_config(config: dict[str, Any], where: str, strategies: tuple[str, ...]) -> None:
    """The checks every LLaVA-style config gets: both sub-configs, a supported decoder, one
    feature layer inside the tower, an exact square patch grid. ``strategies`` are the
    ``vision_feature_select_strategy`` values the family's vision unit handles."""
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{where}: config.json has no {key} object: a LLaVA config needs both text_config and vision_config")
    text = config["text_config"]
    text_type = text.get("model_type", "llama")
    if text_type not in SUPPORTED_DECODERS:
        raise CheckpointError(f"{where}: decoder type '{text_type}' is not supported (supported: {', '.join(SUPPORTED_DECODERS)})")
    if text.get("attention_bias", False):
        raise CheckpointError(f"{where}: q/k/v projections with biases are not supported (attention_bias is true)")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in strategies:
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy '{strategy}' is not supported for this tower (supported: "
            f"{', '.join(repr(s) for s in strategies)}; with a CLS token 'full' would give one more image embedding "
            "than the prompt has <image> placeholders)"
        )
    layer = config.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise CheckpointError(f"{where}: a list of vision_feature_layer values is not supported; use a single layer")
    layer = _integer(config, None, "vision_feature_layer", -2, where)
    depth = _integer(config, "vision_config", "num_hidden_layers", CLIPVisionConfig().num_hidden_layers, where)
    if not (1 <= layer <= depth or -depth <= layer <= -1):
        raise CheckpointError(
            f"{where}: vision_feature_layer {layer} is not a layer of the {depth}-layer vision tower: "
            f"use 1..{depth} or -{depth}..-1 (LLaVA-1.5 uses -2)"
        )
    image_size = _integer(config, "vision_config", "image_size", CLIPVisionConfig().image_size, where)
    patch_size = _integer(config, "vision_config", "patch_size", CLIPVisionConfig().patch_size, where)
    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise CheckpointError(
            f"{where}: vision_config image_size {image_size} is not a whole number of {patch_size}-pixel patches: "
            "the patch grid must be square and exact (LLaVA-1.5: 336 and 14)"
        )
    for key in ("max_position_embeddings", "num_hidden_layers"):
        if key in text and _integer(config, "text_config", key, 1, where) < 1:
            raise CheckpointError(f"{where}: text_config {key} must be positive (got {text[key]})")


def check_crop_size(processor_files: dict[str, Any], image_size: int, where: str) -> None:
    """The saved image processor must crop to the tower's image size, or the patch grid is wrong."""
    for name, data in processor_files.items():
        crop = data.get("crop_size") if isinstance(data, dict) else None
        if crop is None:
            continue
        sizes = {crop.get("height"), crop.get("width")} if isinstance(crop, dict) else {crop}
        if sizes != {image_size}:
            raise CheckpointError(
                f"{where}: {name} crops images to {crop} but config.json's vision_config image_size is {image_size}: "
                "they must agree (LLaVA-1.5: 336)"
            )


def feature_depth(config: Any, num_layers: int) -> int:
    """How many encoder layers run: the ``vision_feature_layer``-th hidden state, as HF counts it."""
    layer = config.vision_feature_layer
    return layer if layer >= 0 else num_layers + 1 + layer


def llava_decoder(model: nn.Module) -> DecoderParts:
    text = model.model.language_model
    return DecoderParts(text.embed_tokens, text.layers, text.norm, text.rotary_emb, model.lm_head)


def sliding_window_limit(config: Any) -> tuple[int, str]:
    """The attention mask has no sliding window, so a Mistral decoder is exact only up to its window."""
    text = config.text_config
    window = getattr(text, "sliding_window", None)
    if window and window < text.max_position_embeddings:
        return window, "the decoder's sliding_window (VisionDrop's attention has no window)"
    return text.max_position_embeddings, "the model's max_position_embeddings"


class ClipVisionUnit(VisionUnit):
    """CLIP tower up to ``vision_feature_layer`` + stage-0 prune + LLaVA projector.

    Layers past the feature layer are never run. Without a stage it reproduces HF's
    feature selection (``default`` drops CLS). The tower may run in another dtype than the
    projector (the reference's fp16 policy keeps CLIP and the stage-0 prune in fp32): the
    pruned tokens are cast to the projector's dtype.
    """

    def __init__(self, llava: nn.Module, stage: Stage | None, ops: tuple = pruning.REFERENCE_OPS):
        super().__init__()
        tower = llava.model.vision_tower
        layers = tower.encoder.layers
        depth = feature_depth(llava.config, len(layers))
        if stage is not None and depth < 1:
            raise CheckpointError("the stage-0 prune needs vision_feature_layer to be an encoder layer")
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(layers[:depth])
        self.projector = llava.model.multi_modal_projector
        self.stage = stage
        self.ops = ops
        self.drop_cls = llava.config.vision_feature_select_strategy == "default"

    def project(self, tokens: Tensor) -> Tensor:
        return self.projector(tokens.to(self.projector.linear_1.weight.dtype))

    def features(self, pixel_values: Tensor, depth: int) -> Tensor:
        """Hidden states after the first ``depth`` encoder layers."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        for layer in self.layers[:depth]:
            hidden = layer(hidden, None)
        return hidden

    def tower_tokens(self, pixel_values: Tensor) -> Tensor:
        return self.features(pixel_values, len(self.layers))

    def canvases(self, pixel_values: Tensor) -> tuple[list[tuple[str, Tensor]], Tensor]:
        return [("image", pixel_values)], torch.arange(self.embeddings.num_patches).unsqueeze(0)

    def forward(self, pixel_values: Tensor, forced: pruning.Choice | None = None) -> tuple[Tensor, ...]:
        if self.stage is None:
            hidden = self.tower_tokens(pixel_values)
            return (self.project(hidden[:, 1:] if self.drop_cls else hidden),)
        hidden = self.features(pixel_values, len(self.layers) - 1)
        last = self.layers[-1]
        hidden, query, key = clip_layer_with_qk(last, hidden)
        scores = pruning.vision_scores(query, key, last.self_attn.scale)
        metric = pruning.heads_mean_metric(key)
        result = pruning.prune(scores, hidden, metric, self.stage.dominant, self.stage.contextual, self.ops, forced=forced)
        return self.project(result.tokens), result.kept_index, result.target_index, scores, result.assignment, metric


def clip_layer_with_qk(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A CLIP encoder layer (SDPA) that also returns its per-head queries and keys."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = layer.layer_norm1(hidden)
    shape = (batch, length, attn.num_heads, attn.head_dim)
    query = attn.q_proj(x).view(shape).transpose(1, 2)
    key = attn.k_proj(x).view(shape).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, query, key


@register_family
class Llava15(Family):
    name = "llava-1.5"
    architecture = "LlavaForConditionalGeneration"
    model_class = LlavaForConditionalGeneration
    model_type = "llava"  # config.json's, with a CLIP tower
    template = PLAIN
    paper_budgets = ("32", "64", "128", "192")
    conversations = CONVERSATIONS  # the recipes besides the checkpoint's own chat_template

    @classmethod
    def accepts(cls, config: dict[str, Any]) -> bool:
        vision = config.get("vision_config")
        vision_type = vision.get("model_type", "clip_vision_model") if isinstance(vision, dict) else "clip_vision_model"
        return config.get("model_type") == cls.model_type and vision_type == "clip_vision_model"

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str) -> None:
        check_llava_config(config, where, strategies=("default",))

    @classmethod
    def check_processor(cls, processor_files: dict[str, Any], config: dict[str, Any], where: str) -> None:
        check_crop_size(processor_files, config["vision_config"].get("image_size", CLIPVisionConfig().image_size), where)

    @classmethod
    def conversation(cls, processor: Any, name: str | None = None) -> PromptTemplate:
        """``checkpoint`` (the processor's chat_template; the default where there is one), ``plain``
        (llava-hf's template, the default otherwise) or another of :attr:`conversations`
        (LLaVA-1.5: ``llava_v1``, the original evaluation)."""
        own = bool(getattr(processor, "chat_template", None))
        name = name or (CHECKPOINT if own else PLAIN.name)
        if name == CHECKPOINT:
            if not own:
                raise SettingError("the checkpoint's processor has no chat_template: use {conversation} " + " or ".join(cls.conversations))
            return rendered_template(processor, getattr(processor, "image_token", "<image>"))
        if name not in cls.conversations:
            raise CheckpointError(f"unknown conversation '{name}' for {cls.name}: use {', '.join([CHECKPOINT, *cls.conversations])}")
        return cls.conversations[name]

    @staticmethod
    def geometry(config: Any) -> VisionGeometry:
        vision = config.vision_config
        return VisionGeometry(vision.image_size, vision.patch_size, has_cls=True)

    @staticmethod
    def vision_unit(model: nn.Module, stage: Stage | None, ops: tuple) -> VisionUnit:
        return ClipVisionUnit(model, stage, ops)

    @staticmethod
    def decoder(model: nn.Module) -> DecoderParts:
        return llava_decoder(model)

    @staticmethod
    def max_positions(config: Any) -> tuple[int, str]:
        return sliding_window_limit(config)

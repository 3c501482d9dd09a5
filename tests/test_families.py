"""The model-family layer: a second family added by one adapter, with nothing else changed.

The toy family below is a LLaVA whose tower is SigLIP: no CLS token, an 8x8 patch grid at
64 px, HF's ``vision_feature_select_strategy="full"`` (every patch is an image token). Its
stage-0 rule cannot use a CLS query, so it ranks patches by the attention they receive,
averaged over heads and queries (the LLM stages' visual-to-visual rule applied in the
tower). Everything it needs from the pipeline is public: it registers, and export, the ONNX
Runtime backend and validate run it through the same code as LLaVA-1.5.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from visiondrop_edge import pruning
from visiondrop_edge.builtin import build_tokenizer, init_seeded
from visiondrop_edge.errors import CheckpointError, UserError
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.families import (FAMILIES, DecoderParts, Family, VisionGeometry, VisionUnit, family_for_config,
                                      register_family)
from visiondrop_edge.families.llava import Llava15, check_llava_config, clip_layer_with_qk, feature_depth, llava_decoder
from visiondrop_edge.loading import load_model
from visiondrop_edge.prompt import build_prompts, pad_token_id, pixel_values, random_images
from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.runtime.validate import validate_artifacts

IMAGE, PATCH = 64, 8


class ReceivedAttentionUnit(VisionUnit):
    """SigLIP up to the feature layer; stage 0 keeps the patches that receive the most attention."""

    def __init__(self, model: nn.Module, stage, ops):
        super().__init__()
        tower = model.model.vision_tower
        self.embeddings = tower.embeddings
        self.layers = nn.ModuleList(tower.encoder.layers[:feature_depth(model.config, len(tower.encoder.layers))])
        self.projector = model.model.multi_modal_projector
        self.stage, self.ops = stage, ops

    def project(self, tokens: Tensor) -> Tensor:
        return self.projector(tokens.to(self.projector.linear_1.weight.dtype))

    def _run(self, pixel_values: Tensor, layers) -> Tensor:
        hidden = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in layers:
            hidden = layer(hidden, None)
        return hidden

    def tower_tokens(self, pixel_values: Tensor) -> Tensor:
        return self._run(pixel_values, self.layers)

    def forward(self, pixel_values: Tensor, forced: pruning.Choice | None = None) -> tuple[Tensor, ...]:
        if self.stage is None:
            return (self.project(self.tower_tokens(pixel_values)),)
        last = self.layers[-1]
        hidden, query, key = clip_layer_with_qk(last, self._run(pixel_values, self.layers[:-1]))
        attention = ((query.float() @ key.float().transpose(-1, -2)) * last.self_attn.scale).softmax(-1)
        scores = attention.mean(1).mean(1)  # [B, N]: attention each patch receives
        metric = pruning.heads_mean_metric(key)
        result = pruning.prune(scores, hidden, metric, self.stage.dominant, self.stage.contextual, self.ops, forced=forced)
        return self.project(result.tokens), result.kept_index, result.target_index, scores, result.assignment, metric


class ToySiglipLlava(Family):
    name = "test-siglip-llava"
    architecture = "LlavaForConditionalGeneration"
    model_class = LlavaForConditionalGeneration
    template = Llava15.template

    @classmethod
    def accepts(cls, config):
        vision = config.get("vision_config")
        return config.get("model_type") == "llava" and isinstance(vision, dict) and vision.get("model_type") == "siglip_vision_model"

    @classmethod
    def check_config(cls, config, where):
        check_llava_config(config, where, strategies=("full",))

    @staticmethod
    def geometry(config) -> VisionGeometry:
        return VisionGeometry(config.vision_config.image_size, config.vision_config.patch_size, has_cls=False)

    @staticmethod
    def vision_unit(model, stage, ops) -> VisionUnit:
        return ReceivedAttentionUnit(model, stage, ops)

    @staticmethod
    def decoder(model) -> DecoderParts:
        return llava_decoder(model)


@pytest.fixture(scope="module")
def toy_family():
    register_family(ToySiglipLlava)
    yield ToySiglipLlava
    FAMILIES.pop(ToySiglipLlava.name)


def toy_config(tokenizer, strategy: str = "full") -> LlavaConfig:
    vision = SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=48, intermediate_size=96,
                                num_hidden_layers=3, num_attention_heads=4, vision_use_head=False)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy=strategy, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory, toy_family):
    """A saved SigLIP-LLaVA with seeded random weights and its processor, as from_pretrained reads it."""
    folder = tmp_path_factory.mktemp("toy-siglip-llava")
    tokenizer = build_tokenizer()
    model = LlavaForConditionalGeneration(toy_config(tokenizer))
    init_seeded(model)
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}),
                               tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0)
    processor.save_pretrained(folder)
    return folder


def test_the_checkpoint_finds_its_family_and_geometry(toy_checkpoint):
    loaded = load_model(str(toy_checkpoint))
    assert loaded.family is ToySiglipLlava
    schedule = loaded.schedule("full")
    assert (schedule.num_patches, schedule.cls_tokens, schedule.image_tokens) == ((IMAGE // PATCH) ** 2, 0, 64)
    # Without CLS the vision stage may keep at most the 64 patches themselves.
    with pytest.raises(UserError, match=r"the encoder has only 64 \(patches\)"):
        loaded.schedule(None, "60+5,2:30+5,4:22+4,6:16+3")


def test_no_family_claims_a_clip_llava_with_the_full_strategy(tmp_path, toy_family):
    """The LLaVA-1.5 adapter refuses 'full' (577 embeddings for 576 placeholders); the toy one
    does not claim CLIP towers, so the refusal is the LLaVA-1.5 one, naming the field."""
    config = Llava15.model_class.config_class().to_dict() | {"vision_feature_select_strategy": "full"}
    with pytest.raises(CheckpointError, match="vision_feature_select_strategy 'full' is not supported"):
        family_for_config(config, "ckpt")


def test_full_budget_is_hf_generate(toy_checkpoint):
    """No pruning means HF's own LLaVA forward with this tower: the geometry (64 image tokens,
    no CLS to drop) and the decoder cut agree with transformers token for token."""
    loaded = load_model(str(toy_checkpoint))
    schedule = loaded.schedule("full")
    pixels = pixel_values(loaded.processor.image_processor, random_images(2, seed=3))
    batch = build_prompts(loaded.tokenizer, loaded.template, ["a cat?", "what is in this picture?"],
                          schedule.image_tokens, loaded.config.image_token_id, pad_token_id(loaded.tokenizer))
    ours = greedy_generate(TorchBackend(loaded, schedule), pixels, batch, 6)
    hf = loaded.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels,
                               max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert ours.tokens.tolist() == hf.sequences[:, batch.input_ids.shape[1]:].tolist()
    for step, (mine, theirs) in enumerate(zip(ours.step_logits, hf.logits)):
        # fp32, the same ops in another grouping (our cut vs HF's modules): rounding only.
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("budget", [16, 32])
def test_the_toy_family_exports_and_validates(toy_checkpoint, tmp_path, budget):
    loaded = load_model(str(toy_checkpoint))
    schedule = loaded.schedule(budget)
    out = tmp_path / f"toy-{budget}"
    manifest = export_artifacts(loaded, schedule, out, ExportOptions(max_seq_len=512))
    assert manifest.model["family"] == ToySiglipLlava.name and manifest.spec["schedule"]["cls_tokens"] == 0
    report = validate_artifacts(out, new_tokens=8)
    assert report.passed, [c.name for c in report.checks.values() if not c.passed]

"""PyTorch backend: the VisionDrop units run eagerly on the loaded HF model's weights."""

from __future__ import annotations

import torch
from torch import Tensor

from visiondrop_edge.contract import QKV, PruneOutputs, bind, decoder_outputs, vision_outputs
from visiondrop_edge.errors import SettingError
from visiondrop_edge.loading import LoadedModel, parameter_dtype
from visiondrop_edge.modules import VisionDropPipeline
from visiondrop_edge.prompt import pad_token_id
from visiondrop_edge.pruning import Choice
from visiondrop_edge.schedule import Schedule

from .base import Backend, DecoderState, ModelSpec, group_results
from .static_decode import StaticDecoder
from .static_prefill import GraphedCalls


class TorchBackend(Backend):
    """The reference backend every exported one is validated against.

    ``forced`` maps a stage (0 = vision, s + 1 = LLM stage s) to a :class:`Choice` that
    replaces that stage's own decisions: validate re-runs the reference on a candidate
    backend's tie-equivalent choices to compare everything downstream strictly (on an eager
    backend: a recorded call would keep the choices it was recorded with).

    ``cuda_graph`` (a CUDA device): decode steps replay a CUDA graph on static buffers
    (:mod:`.static_decode`), and vision encodes and prefills replay their recorded call once
    their shapes repeat (:mod:`.static_prefill`).
    """

    name = "torch"

    def __init__(self, loaded: LoadedModel, schedule: Schedule, cuda_graph: bool = False):
        model = loaded.model
        self.forced: dict[int, Choice] = {}
        self.loaded = loaded
        self.pipeline = VisionDropPipeline(model, schedule, family=loaded.family).eval()
        self._pipelines = {schedule: self.pipeline}  # per crop grid's schedule, shared by every bound copy
        self.device = next(model.parameters()).device
        family = loaded.family
        self.spec = ModelSpec.from_config(
            model.config, schedule, family.name, loaded.template, parameter_dtype(family.decoder(model).layers), pad_token_id(loaded.tokenizer),
            parameter_dtype(family.tower_parameters(model)),
        )
        if cuda_graph and self.device.type != "cuda":
            raise SettingError(f"{{cuda_graph}} needs the model on a CUDA device (it is on {self.device}): load it with {{device}} cuda")
        self.static_decoder = StaticDecoder(self, capture=True) if cuda_graph else None
        self.replays = GraphedCalls() if cuda_graph else None

    def for_grid(self, grid):
        bound = super().for_grid(grid)
        schedule = bound.spec.schedule
        if schedule not in self._pipelines:  # the units over the same weights: nothing is copied
            self._pipelines[schedule] = VisionDropPipeline(self.loaded.model, schedule, family=self.loaded.family).eval()
        bound.pipeline = self._pipelines[schedule]
        if bound is not self and self.static_decoder is not None:  # its steps must run the bound copy's units
            bound.static_decoder = StaticDecoder(bound, self.static_decoder.capture)
        return bound

    def decode_step(self, tokens: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """With ``cuda_graph``: each step one CUDA graph replay on static buffers (:mod:`.static_decode`)."""
        if self.static_decoder is None:
            return super().decode_step(tokens, state)
        return self.static_decoder.step(tokens.to(self.device), state)  # buffers outside inference mode: extend may write on

    @torch.inference_mode()
    def run_vision(self, pixel_values: Tensor) -> dict[str, Tensor]:
        outputs = self.pipeline.vision(pixel_values, self.forced.get(0))
        return bind(vision_outputs(not self.spec.schedule.is_full), outputs)

    @torch.inference_mode()
    def run_embed(self, input_ids: Tensor) -> Tensor:
        return self.pipeline.embed_tokens(input_ids)

    @torch.inference_mode()
    def run_qkv(self, hidden_states: Tensor) -> QKV:
        return self.pipeline.qkv(hidden_states)

    @torch.inference_mode()
    def run_prune(self, stage, hidden_states, query, key, value, attention_mask, image_offset) -> PruneOutputs:
        return self.pipeline.prunes[stage](
            hidden_states, query, key, value, attention_mask, image_offset, self.forced.get(stage + 1)
        )

    @torch.inference_mode()
    def run_group(self, group, hidden_states, query, key, value, attention_mask, position_ids, past):
        outputs = self.pipeline.groups[group](hidden_states, query, key, value, attention_mask, position_ids, *past)
        start, stop = self.spec.schedule.layer_groups()[group]
        return group_results(self.spec.schedule, group, bind(decoder_outputs(range(start, stop), group == self.num_groups - 1), outputs))


"""The pipeline's units, as torch modules over a loaded HF LLaVA's own sub-modules.

Each unit is one exported graph (see ``export/``), so PyTorch and every other backend run
the same cut of the model:

- the family's vision unit (``visiondrop_edge.families``): pixels -> image embeddings, with
  the stage-0 prune inside;
- :class:`QKVProjection`: the first decoder layer up to its q/k/v projections;
- :class:`LLMPrune`: an LLM-stage prune (weightless: it scores with the q/k of the next
  layer that the group before it projected on the unpruned sequence, and carries those
  projections through the prune so they are computed once per token);
- :class:`DecoderGroup`: RoPE and the rest of its first layer (from its q/k/v), then the
  group's other layers, then the next group's first-layer norm and q/k/v projections (the
  last group ends in the final norm and the LM head, last position only).

The q/k/v cut exists so that every weight lives in exactly one unit: the prune needs the
next layer's norm/q/k weights, and prefill and decode must share one copy of them. Cutting
it at the end of the group before (not in a graph of its own) keeps a decode step at one
graph call per group. Decoder layer math is the Llama family's, written over the HF
modules' weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from . import pruning
from .contract import QKV, PruneOutputs
from .families import Family, family_of
from .schedule import Schedule, Stage


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Contiguous positions of the real tokens (padding gets 0): renumbering after a prune.

    The running count is an fp32 CumSum (exact below 2^24 tokens) and padding is zeroed by a
    Where, not clipped: onnx-tensorrt documents CumSum and Clip for float types only. (Not a
    multiply by the mask either: ONNX-GraphSurgeon's cast elision rewrites int->float->Mul->int
    into an integer Mul while leaving the CumSum operand float, a type error.)
    """
    return torch.where(attention_mask.bool(), attention_mask.float().cumsum(-1) - 1, 0.0).long()


def causal_mask(attention_mask: Tensor, query_len: int, dtype: torch.dtype) -> Tensor:
    """Additive [B, 1, S, T] mask in ``dtype``: causal over ``T - S`` cached tokens, pads hidden.

    A padded query row still sees itself, so no row is fully masked (no NaN in SDPA). The
    mask is additive in the activations' dtype (not boolean) so that the exported graph
    keeps attention in that dtype.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - query_len:].unsqueeze(-1)
    allowed = (key_pos <= query_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    allowed = (allowed | (key_pos == query_pos)).unsqueeze(1)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- decoder
def project_qkv(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A Llama layer's input norm and q/k/v projections (before RoPE) -> [B, H(kv), S, hd] each."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    query = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    value = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    return query, key, value


def rotate(rotary: nn.Module, query: Tensor, key: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE at ``position_ids`` (the rotary module holds only the inverse frequencies, no weights)."""
    cos, sin = rotary(query, position_ids)
    return apply_rotary_pos_emb(query, key, cos, sin)


def rope(rotary: nn.Module, x: Tensor, position_ids: Tensor) -> Tensor:
    """RoPE of one per-head tensor [B, H, S, hd] (``rotate`` does a query/key pair at once)."""
    cos, sin = rotary(x, position_ids)
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def splice_sequence(
    hidden: Tensor, qkv: tuple[Tensor, ...], attention_mask: Tensor, image_offset: Tensor, num_visual: int,
    new_hidden: Tensor, new_qkv: tuple[Tensor, ...], kept: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor, Tensor]:
    """Replace the visual block of a sequence by its rows at positions ``kept`` [B, k] (if
    given), then the new rows: hidden states [B, S, D], per-head q/k/v, the mask and the
    renumbered positions. One splice index moves every tensor."""
    source = pruning.splice_source(image_offset, attention_mask.shape[1], num_visual, new_hidden.shape[1], kept)
    qkv = tuple(pruning.spliced(t, new, source, dim=2) for t, new in zip(qkv, new_qkv, strict=True))
    # the block's tokens are all real (mask 1), the kept ones and the new ones alike
    ones = torch.ones_like(attention_mask[:, :1]).expand(-1, new_hidden.shape[1])
    attention_mask = pruning.spliced(attention_mask, ones, source)
    return pruning.spliced(hidden, new_hidden, source), qkv, attention_mask, positions_from_mask(attention_mask)


def attend(
    layer: nn.Module, hidden: Tensor, query: Tensor, key: Tensor, value: Tensor,
    past_key: Tensor, past_value: Tensor, mask: Tensor,
) -> Tensor:
    """The rest of a Llama layer after its RoPE-applied q/k/v: attention over the cache and the
    new tokens, o_proj, MLP -> the new hidden states.

    The cache is read where it lies, never copied into a concatenation with the new keys:
    the queries score the cached keys and the new ones separately, one softmax runs over both
    score blocks side by side (``mask`` [B, 1, S, P + S] covers the cache then the new
    tokens), and the two value products are summed. GQA query heads are folded onto their KV
    head ([B, H_kv, groups * S, hd]), so no KV head is repeated either.
    """
    attn = layer.self_attn
    batch, heads, length, dim = query.shape
    kv_heads, past = key.shape[1], past_key.shape[2]
    query = query.reshape(batch, kv_heads, heads // kv_heads * length, dim) * attn.scaling
    scores = torch.cat([query @ past_key.transpose(2, 3), query @ key.transpose(2, 3)], dim=-1)
    scores = scores.view(batch, kv_heads, heads // kv_heads, length, -1) + mask.unsqueeze(2)
    probs = scores.softmax(-1).view(batch, kv_heads, heads // kv_heads * length, -1)
    out = (probs[..., :past] @ past_value + probs[..., past:] @ value).view(batch, heads, length, dim)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _heads_to_rows(x: Tensor) -> Tensor:
    """[B, H, S, hd] -> [B, S, H * hd]."""
    return x.transpose(1, 2).flatten(2)


def _rows_to_heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, H * hd] -> [B, H, S, hd]."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


class QKVProjection(nn.Module):
    """Graph ``qkv_0``: q/k/v (before RoPE) of the first decoder layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: Tensor) -> QKV:
        return QKV(*project_qkv(self.layer, hidden_states))


class LLMPrune(nn.Module):
    """Graph ``prune_{s}``: an LLM-stage prune of the ``num_visual``-token block. No weights.

    It scores with the next layer's q/k (from ``decoder_{s}`` on the unpruned sequence, RoPE'd
    here at the current positions) and returns the pruned sequence ``[text before, dominant,
    contextual, text after]`` with positions renumbered, together with that layer's q/k/v
    for it (carried through the prune, see :func:`visiondrop.pruning.prune_block`), so the
    layer's projections run once per token. The splice (:func:`splice_sequence`) takes the
    dominant tokens straight from where they lie.
    """

    def __init__(self, stage: Stage, num_visual: int, scale: float, rotary: nn.Module, rms_eps: float, ops: tuple = pruning.REFERENCE_OPS):
        super().__init__()
        self.stage = stage
        self.num_visual = num_visual
        self.scale = scale
        self.rotary = rotary
        self.rms_eps = rms_eps
        self.ops = ops

    def forward(
        self, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor, image_offset: Tensor,
        forced: pruning.Choice | None = None,
    ) -> PruneOutputs:
        positions = pruning.visual_positions(image_offset, self.num_visual)
        position_ids = positions_from_mask(attention_mask)
        visual_query = pruning.gather_positions(query, positions)
        # RoPE at the current positions: every key (they are all attended), the visual queries only.
        rotated_query = rope(self.rotary, visual_query, torch.gather(position_ids, 1, positions))
        rotated_key = rope(self.rotary, key, position_ids)
        scores = pruning.llm_scores(rotated_query, rotated_key, attention_mask, positions, self.scale)
        metric = pruning.heads_mean_metric(pruning.gather_positions(rotated_key, positions))
        k, c = self.stage.dominant, self.stage.contextual
        qkv = (query, key, value)
        if self.ops is pruning.REFERENCE_OPS or forced is not None:
            result = pruning.prune_block(scores, metric, hidden_states, qkv, positions, k, c, self.rms_eps, forced)
            kept, new_tokens, new_qkv = result.kept_positions, result.contextual, result.contextual_projections
        else:  # the plugin ops take the block's tokens and their projections as one [B, N, D + P] tensor
            result, new_tokens, new_qkv = self._prune_with_plugins(hidden_states, qkv, positions, scores, metric)
            kept = None
        hidden_states, (query, key, value), attention_mask, position_ids = splice_sequence(
            hidden_states, qkv, attention_mask, image_offset, self.num_visual, new_tokens, new_qkv, kept
        )
        return PruneOutputs(
            pruned_hidden_states=hidden_states, pruned_query=query, pruned_key=key, pruned_value=value,
            pruned_attention_mask=attention_mask, pruned_position_ids=position_ids,
            kept_index=result.kept_index, target_index=result.target_index, scores=scores, assignment=result.assignment,
            merge_metric=metric,
        )

    def _prune_with_plugins(
        self, hidden_states: Tensor, qkv: tuple[Tensor, ...], positions: Tensor, scores: Tensor, metric: Tensor,
    ) -> tuple[pruning.PruneResult, Tensor, tuple[Tensor, ...]]:
        """The block's new tokens and their per-head q/k/v through ``self.ops``, whole (dominant, then contextual)."""
        visual = [pruning.gather_positions(t, positions) for t in qkv]
        projections = torch.cat([_heads_to_rows(t) for t in visual], dim=-1)
        result = pruning.prune(
            scores, pruning.gather_rows(hidden_states, positions), metric, self.stage.dominant, self.stage.contextual,
            self.ops, carried=(projections, self.rms_eps),
        )
        widths = [t.shape[1] * t.shape[3] for t in visual]
        rows = result.projections.split(widths, dim=-1)
        return result, result.tokens, tuple(_rows_to_heads(r, t.shape[1]) for r, t in zip(rows, visual, strict=True))


class DecoderGroup(nn.Module):
    """Graph ``decoder_{g}``: decoder layers ``[start, stop)``, the first one from its q/k/v.

    ``query``/``key``/``value`` are the first layer's projections before RoPE (applied here
    at ``position_ids``). ``past`` is ``(key_0, value_0, key_1, value_1, ...)`` for the
    group's layers, each [B, H_kv, P, hd]: the cache as the runtime holds it, whose unfilled
    slots ``attention_mask`` masks out. The outputs are the hidden states and layer
    ``stop``'s q/k/v projections of them (``next_layer``'s: the next group's first layer),
    or, for the last group, the final-norm LM-head logits of the last position; then the new
    tokens' keys (after RoPE) and values, [B, H_kv, S, hd] each, which the runtime writes
    into its cache: the graph never copies the cache.
    """

    def __init__(self, layers: list[nn.Module], rotary: nn.Module, next_layer: nn.Module | None = None,
                 norm: nn.Module | None = None, lm_head: nn.Module | None = None):
        super().__init__()
        if (next_layer is None) == (lm_head is None):
            raise ValueError("a decoder group ends in either the next group's first layer or the LM head")
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary
        self.next_layer = next_layer
        self.norm = norm
        self.lm_head = lm_head

    def forward(
        self, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor,
        attention_mask: Tensor, position_ids: Tensor, *past: Tensor,
    ) -> tuple[Tensor, ...]:
        mask = causal_mask(attention_mask, hidden_states.shape[1], hidden_states.dtype)
        new_key_values: list[Tensor] = []
        for index, layer in enumerate(self.layers):
            if index > 0:
                query, key, value = project_qkv(layer, hidden_states)
            query, key = rotate(self.rotary, query, key, position_ids)
            hidden_states = attend(layer, hidden_states, query, key, value, past[2 * index], past[2 * index + 1], mask)
            new_key_values += [key, value]
        if self.lm_head is not None:
            return (self.lm_head(self.norm(hidden_states[:, -1])).float(), *new_key_values)
        return (hidden_states, *project_qkv(self.next_layer, hidden_states), *new_key_values)


class VisionDropPipeline(nn.Module):
    """A loaded model cut into VisionDrop units for one schedule (weights are shared, not copied).

    The family (default: the model's own) gives the vision unit and the decoder's parts.
    ``ops`` are the (select, merge) implementations of the prunes: the reference math, or
    the plugin stand-ins that plugin-mode export traces into TensorRT plugin nodes.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, ops: tuple = pruning.REFERENCE_OPS, family: type[Family] | None = None):
        super().__init__()
        family = family or family_of(model)
        text = family.decoder(model)
        if len(text.layers) != schedule.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the decoder has {len(text.layers)}")
        self.schedule = schedule
        self.config = model.config
        self.embed_tokens = text.embed_tokens
        self.vision = family.pipeline_vision(model, schedule, ops)
        groups = schedule.layer_groups()
        self.qkv = QKVProjection(text.layers[0])
        scale = text.layers[0].self_attn.scaling
        visual_counts = schedule.stage_inputs()
        self.prunes = nn.ModuleList(
            LLMPrune(stage, visual_counts[i], scale, text.rotary_emb,
                     text.layers[stage.after_layer].input_layernorm.variance_epsilon, ops)
            for i, stage in enumerate(schedule.llm_stages)
        )
        last = len(groups) - 1
        self.groups = nn.ModuleList(
            DecoderGroup(
                list(text.layers[start:stop]), text.rotary_emb, next_layer=None if g == last else text.layers[stop],
                norm=text.norm if g == last else None, lm_head=text.lm_head if g == last else None,
            )
            for g, (start, stop) in enumerate(groups)
        )

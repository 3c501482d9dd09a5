"""A deliberately naive VisionDrop, written from ../shared/VISIONDROP.md for the tests only.

One sample at a time, Python loops and lists for selection and merging, HF's own eager
layers with ``output_attentions=True`` for the vision scores, HF decoder layers with a
``DynamicCache`` for the LLM. It shares no code with the pipeline under test: only the
spec, so a bug in the batched math cannot hide in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class NaiveStage:
    kept: list[int]  # dominant indices in the stage's input numbering (ascending)
    targets: list[int]  # contextual target indices in the stage's input numbering
    scores: list[float]


@dataclass
class NaiveResult:
    image_embeds: torch.Tensor  # [V0, D]
    stages: list[NaiveStage] = field(default_factory=list)  # vision stage first
    step_logits: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def _top(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` highest scores, lower index first on ties, returned ascending."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:count])


def _merge(hidden: torch.Tensor, metric: torch.Tensor, rest: list[int], c: int) -> tuple[list[torch.Tensor], list[int]]:
    """Contextual tokens from the ``rest`` rows: targets by stride, target + mean of members."""
    stride = max(1, len(rest) // c)
    target_pos = list(range(0, len(rest), stride))[:c]
    normed = {i: metric[i].double() / metric[i].double().norm() for i in rest}
    members: dict[int, list[int]] = {t: [] for t in target_pos}
    for pos, token in enumerate(rest):
        if pos in members:
            continue
        sims = [float(normed[token] @ normed[rest[t]]) for t in target_pos]
        best = max(range(len(sims)), key=lambda j: (sims[j], -j))  # first target wins ties
        members[target_pos[best]].append(token)
    out = []
    for t in target_pos:
        target = hidden[rest[t]].double()
        group = members[t]
        mean = sum((hidden[i].double() for i in group), torch.zeros_like(target)) / max(1, len(group))
        out.append((target + mean).to(hidden.dtype))
    return out, [rest[t] for t in target_pos]


@torch.no_grad()
def naive_vision(llava, pixel_values: torch.Tensor, stage) -> tuple[torch.Tensor, NaiveStage | None]:
    """One image [3, H, W] -> image embeddings, with stage 0 done per the spec."""
    tower = llava.model.vision_tower
    out = tower(pixel_values[None], output_hidden_states=True, output_attentions=True)
    feature_layer = llava.config.vision_feature_layer
    hidden = out.hidden_states[feature_layer][0]  # [N + 1, D]
    if stage is None:
        return llava.model.multi_modal_projector(hidden[1:]), None
    depth = feature_layer if feature_layer >= 0 else len(out.hidden_states) + feature_layer
    attention = out.attentions[depth - 1][0]  # the feature layer's [H, N + 1, N + 1]
    patch_scores = attention[:, 0, 1:].sum(0).tolist()
    kept = [0] + [i + 1 for i in _top(patch_scores, stage.dominant - 1)]
    # the feature layer's keys: its k_proj applied to its normalised input
    layer = tower.encoder.layers[depth - 1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[depth - 1][0]))
    metric = keys.view(keys.shape[0], layer.self_attn.num_heads, -1).mean(1)
    rest = [i for i in range(hidden.shape[0]) if i not in kept]
    contextual, targets = _merge(hidden, metric, rest, stage.contextual)
    tokens = torch.stack([hidden[i] for i in kept] + contextual)
    return llava.model.multi_modal_projector(tokens), NaiveStage(kept, targets, [float("inf")] + patch_scores)


@torch.no_grad()
def naive_next_vision(model, views: torch.Tensor, rows: int, cols: int, stage) -> tuple[torch.Tensor, NaiveStage]:
    """A LLaVA-NeXT image's views [1 + rows * cols, 3, H, W] (base first, crops row-major) ->
    its visual block, per VISIONDROP_NEXT_REFERENCE.md: every view pruned alone (its own CLS),
    then [base (k+c) | crop patches by global raster index over the stitched padded grid |
    crop CLS | crop contextual]. The trace numbers view v's token t as v * (patches + 1) + t."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_view = [naive_vision(model, view, stage) for view in views]
    k = stage.dominant
    base = list(per_view[0][0])
    patches, crop_cls, contextual = [], [], []
    for m, (tokens, traced) in enumerate(per_view[1:]):
        r, q = divmod(m, cols)
        for row, token in zip(tokens[1:k], traced.kept[1:]):
            i, j = divmod(token - 1, side)
            patches.append(((side * r + i) * (side * cols) + side * q + j, row))
        crop_cls.append(tokens[0])
        contextual.extend(tokens[k:])
    block = base + [row for _, row in sorted(patches, key=lambda item: item[0])] + crop_cls + contextual
    width = side * side + 1
    trace = NaiveStage(
        [v * width + t for v, (_, traced) in enumerate(per_view) for t in traced.kept],
        [v * width + t for v, (_, traced) in enumerate(per_view) for t in traced.targets],
        [score for _, traced in per_view for score in traced.scores],
    )
    return torch.stack(block), trace


def _llm_stage(layer, rotary, hidden, offset: int, num_visual: int, stage):
    """Score the visual block with ``layer``'s norm/q/k/RoPE and prune it."""
    attn = layer.self_attn
    seq = hidden.shape[0]
    positions = torch.arange(seq)[None]
    x = layer.input_layernorm(hidden[None])
    q = attn.q_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, seq, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(x, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_full = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[0].double() @ k_full[0].double().transpose(-1, -2)) * attn.scaling  # [H, S, S]
    logits = logits + torch.triu(torch.full((seq, seq), float("-inf"), dtype=torch.float64), diagonal=1)
    probs = logits.softmax(-1).mean(0)  # [S, S]
    visual = list(range(offset, offset + num_visual))
    scores = [sum(float(probs[i, j]) for i in visual) / num_visual for j in visual]
    kept_local = _top(scores, stage.dominant)
    metric = k[0, :, offset:offset + num_visual].mean(0)  # RoPE-applied keys, mean over kv heads
    block = hidden[offset:offset + num_visual]
    rest = [i for i in range(num_visual) if i not in kept_local]
    contextual, targets = _merge(block, metric, rest, stage.contextual)
    new_block = torch.stack([block[i] for i in kept_local] + contextual)
    new_hidden = torch.cat([hidden[:offset], new_block, hidden[offset + num_visual:]])
    return new_hidden, NaiveStage(kept_local, targets, scores)


def _float_mask(query_len: int, total: int) -> torch.Tensor:
    past = total - query_len
    mask = torch.full((query_len, total), float("-inf"))
    for i in range(query_len):
        mask[i, : past + i + 1] = 0.0
    return mask[None, None]


@torch.no_grad()
def naive_generate(llava, pixel_values: torch.Tensor, input_ids: list[int], image_token_id: int, schedule, max_new_tokens: int, eos: int | None) -> NaiveResult:
    """One sample, no padding: ``input_ids`` holds a single ``<image>`` placeholder.

    A schedule with a crop grid takes a LLaVA-NeXT image's views [1 + rows * cols, 3, H, W];
    its first LLM stage prunes the whole visual block, or in ``base`` scope the base view's
    ``k+c`` tokens only (the crops' tokens then follow it like text)."""
    if schedule.grid is None:
        image_embeds, vision_stage = naive_vision(llava, pixel_values, schedule.vision)
        num_visual = image_embeds.shape[0]
    else:
        image_embeds, vision_stage = naive_next_vision(llava, pixel_values, schedule.grid.rows, schedule.grid.cols, schedule.vision)
        num_visual = schedule.vision.total if schedule.scope == "base" else image_embeds.shape[0]
    text = llava.model.language_model
    at = input_ids.index(image_token_id)
    embed = text.embed_tokens
    hidden = torch.cat([embed(torch.tensor(input_ids[:at])), image_embeds, embed(torch.tensor(input_ids[at + 1:]))])
    result = NaiveResult(image_embeds, [vision_stage] if vision_stage else [])
    prune_before = {s.after_layer: s for s in schedule.llm_stages}  # 1-based "after l" == 0-based layer l
    cache = DynamicCache(config=text.config)
    for index, layer in enumerate(text.layers):
        if index in prune_before:
            stage = prune_before[index]
            hidden, traced = _llm_stage(layer, text.rotary_emb, hidden, at, num_visual, stage)
            result.stages.append(traced)
            num_visual = stage.total
        positions = torch.arange(hidden.shape[0])[None]  # renumbered contiguously after each prune
        hidden = layer(
            hidden[None], attention_mask=_float_mask(hidden.shape[0], hidden.shape[0]), position_ids=positions,
            past_key_values=cache, position_embeddings=text.rotary_emb(hidden[None], positions),
        )[0]
    logits = llava.lm_head(text.norm(hidden[-1]))
    for step in range(max_new_tokens):
        result.step_logits.append(logits)
        token = int(logits.argmax())
        result.tokens.append(token)
        if token == eos or step == max_new_tokens - 1:
            break
        hidden = embed(torch.tensor([[token]]))
        for index, layer in enumerate(text.layers):
            past = cache.get_seq_length(index)  # the group's cache length is the new position
            positions = torch.tensor([[past]])
            hidden = layer(
                hidden, attention_mask=_float_mask(1, past + 1), position_ids=positions,
                past_key_values=cache, position_embeddings=text.rotary_emb(hidden, positions),
            )
        logits = llava.lm_head(text.norm(hidden[0, -1]))
    return result

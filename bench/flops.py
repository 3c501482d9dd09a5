"""Analytic FLOPs per pipeline stage (multiply-add = 2 FLOPs), for the benchmark report.

Counts the matrix work that dominates each unit: projections, attention products (causal:
half the square), MLPs, and for the prunes the scoring product and the merge similarity.
Elementwise work (norms, softmax, RoPE, ranking comparisons) is ignored: it is small next
to the matmuls at every budget.
"""

from __future__ import annotations

from typing import Any

from visiondrop_edge.schedule import Schedule


def _decoder_layer(tokens: int, context: int, hidden: int, kv_width: int, intermediate: int, causal: bool) -> float:
    projections = 2 * tokens * hidden * (2 * hidden + 2 * kv_width)  # q, o and k, v
    attention = 2 * 2 * tokens * context * hidden * (0.5 if causal else 1.0)  # q.k and p.v
    mlp = 2 * 3 * tokens * hidden * intermediate
    return projections + attention + mlp


def stage_flops(config: Any, schedule: Schedule, text_tokens: int, batch: int, ideal: bool = False) -> dict[str, float]:
    """FLOPs of vision encode (every view of a multi-crop image), each prune, each decoder group's
    prefill, the LM head, and one decode step.

    ``text_tokens`` is the prompt length without the image; ``ideal`` counts the baseline
    that feeds each group exactly its stage's size with no scoring or merging.
    """
    vision, text = config.vision_config, config.text_config
    patches, n = schedule.num_patches, schedule.vision_inputs  # a ViT tower: patch embedding, then n tokens
    dv, d = vision.hidden_size, text.hidden_size
    depth = config.vision_feature_layer if config.vision_feature_layer >= 0 else vision.num_hidden_layers + 1 + config.vision_feature_layer
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = d // heads
    kv_width = kv_heads * head_dim
    flops: dict[str, float] = {}
    vision_layer = 2 * n * dv * 4 * dv + 2 * 2 * n * n * dv + 2 * 2 * n * dv * vision.intermediate_size
    image_tokens, views = schedule.image_tokens, schedule.views
    projected = image_tokens if schedule.stages else views * patches  # unpruned multi-crop: HF's newlines are not projected
    flops["vision"] = batch * (
        views * (2 * patches * 3 * vision.patch_size**2 * dv + depth * vision_layer) + 2 * projected * (dv * d + d * d)
    )
    if schedule.vision is not None and not ideal:  # every view's stage-0 prune
        rest = n - schedule.vision.dominant
        flops["vision"] += batch * views * (2 * n * dv + 2 * (rest - schedule.vision.contextual) * schedule.vision.contextual * (dv // vision.num_attention_heads) + rest * dv)
    blocks, seen = schedule.stage_inputs(), schedule.group_tokens()  # what each LLM stage prunes; what each group sees
    for group, ((start, stop), visual) in enumerate(zip(schedule.layer_groups(), seen)):
        before = seen[group - 1] if group > 0 else visual  # the sequence's visual tokens before this group's prune
        projected = text_tokens + before  # rows the group's first-layer projections see (ideal too: the group before projects them)
        if group > 0 and not ideal:
            stage, block = schedule.llm_stages[group - 1], blocks[group - 1]
            rest = block - stage.dominant
            width = d + d + 2 * kv_width  # hidden states plus the carried q/k/v
            flops[f"prune_{group - 1}"] = batch * (
                2 * block * (text_tokens + before) * d  # the block's queries against all keys
                + 2 * (rest - stage.contextual) * stage.contextual * head_dim + rest * width
            )
        seq = text_tokens + visual
        layers = stop - start
        first_projections = 2 * projected * d * (d + 2 * kv_width)  # the first layer's q, k, v (qkv_0's or the group before's graph)
        rest_of_first = _decoder_layer(seq, seq, d, kv_width, text.intermediate_size, True) - 2 * seq * d * (d + 2 * kv_width)
        flops[f"decoder_{group}"] = batch * (
            first_projections + rest_of_first + (layers - 1) * _decoder_layer(seq, seq, d, kv_width, text.intermediate_size, True)
        )
    flops["lm_head"] = batch * 2 * d * text.vocab_size
    flops["prefill_total"] = sum(v for k, v in flops.items() if k != "vision")
    decode = 0.0
    for (start, stop), visual in zip(schedule.layer_groups(), seen):
        decode += (stop - start) * _decoder_layer(1, text_tokens + visual + 1, d, kv_width, text.intermediate_size, False)
    flops["decode_step"] = batch * (decode + 2 * d * text.vocab_size)
    return flops

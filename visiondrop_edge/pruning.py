"""The VisionDrop math, once, as batched static-shape torch ops.

Every function here takes ``[B, N, ...]`` tensors and Python-int counts. Output shapes depend
only on the input shapes and the counts, there are no host syncs, per-sample loops,
``nonzero`` or boolean-mask indexing: the ONNX exporter traces these same functions into
static graphs, and the TensorRT plugins are checked against them. Scores, similarities and
merge sums are computed in fp32 whatever the token dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor


@dataclass
class Choice:
    """What a stage decided, enough to replay it: validate forces a candidate backend's
    choices into the reference math to compare everything downstream of a tie."""

    kept_index: Tensor  # [B, k]: the dominant tokens (any order)
    assignment: Tensor  # [B, R - c]: each member's contextual slot (see :func:`merge`)


@dataclass
class PruneResult:
    """A stage's output tokens and what it chose, in the stage's input numbering."""

    tokens: Tensor  # [B, k + c, D]: dominant (index order), then contextual (target order)
    kept_index: Tensor  # [B, k] int64, ascending
    target_index: Tensor  # [B, c] int64, ascending
    rest_index: Tensor  # [B, N - k] int64: the tokens not kept, ascending
    assignment: Tensor  # [B, R - c] int64: each member's contextual slot (members: rest minus targets)
    projections: Tensor | None = None  # [B, k + c, P]: the carried projections of the output tokens


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, i]]`` for ``x`` of shape [B, N, D] and ``index`` [B, K] -> [B, K, D].

    Rows are taken from the flattened [B * N, D] tensor with one row index per output row
    (a plain Gather), not an element-wise gather whose index would be as large as the data.
    """
    batch, length = x.shape[:2]
    flat = index + torch.arange(batch, device=index.device).unsqueeze(-1) * length
    return x.flatten(0, 1).index_select(0, flat.flatten()).view(batch, index.shape[1], *x.shape[2:])


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """``x[b, h, positions[b, i]]`` for per-head ``x`` [B, H, S, hd] -> [B, H, V, hd]."""
    batch, heads, length, _ = x.shape
    rows = torch.arange(batch * heads, device=positions.device).view(batch, heads, 1) * length
    flat = rows + positions.unsqueeze(1)  # [B, H, V]
    return x.flatten(0, 2).index_select(0, flat.flatten()).view(batch, heads, positions.shape[1], x.shape[-1])


def topk_order(scores: Tensor, k: int) -> Tensor:
    """Permutation [B, N]: the top-``k`` indices ascending, then the other indices ascending.

    Ties go to the lower index, on every backend: a token's rank is the number of tokens with
    a higher score plus the number of equal-scored tokens before it, so ranks are a
    permutation and ``rank < k`` selects exactly ``k``. Pure comparisons, sums and one
    scatter of a permutation (no duplicate indices), which ONNX Runtime and TensorRT run
    deterministically; ``torch.topk`` gives no such guarantee.
    """
    n = scores.shape[-1]
    index = torch.arange(n, device=scores.device)
    higher = scores.unsqueeze(-2) > scores.unsqueeze(-1)  # [B, i, j]: s_j > s_i
    tied_before = (scores.unsqueeze(-2) == scores.unsqueeze(-1)) & (index[None, :] < index[:, None])
    rank = (higher | tied_before).to(torch.int64).sum(-1)
    kept = rank < k
    ones = kept.float()  # CumSum in fp32 (exact below 2^24; onnx-tensorrt documents it for float types only)
    destination = torch.where(kept, ones.cumsum(-1) - 1, k + (1 - ones).cumsum(-1) - 1).long()
    return torch.zeros_like(destination).scatter(1, destination, index.expand_as(destination))


def target_positions(num_rest: int, c: int) -> slice:
    """Contextual targets: rest positions ``0, s, 2s, ...`` with ``s = max(1, R // c)``, the first ``c``.

    A slice (a strided view), so selecting them copies nothing from the host.
    """
    stride = max(1, num_rest // c)
    return slice(0, (c - 1) * stride + 1, stride)


def member_positions(num_rest: int, c: int, device: torch.device | str | None = None) -> Tensor:
    """The ``R - c`` non-target rest positions, ascending, computed on ``device`` (no host copy)."""
    stride = max(1, num_rest // c)
    m = torch.arange(num_rest - c, device=device)
    if stride == 1:  # the targets are the first c positions
        return m + c
    between = (c - 1) * (stride - 1)  # members between the targets, stride - 1 per gap
    return torch.where(m < between, m + m // (stride - 1) + 1, m - between + (c - 1) * stride + 1)


def l2_normalize(x: Tensor) -> Tensor:
    """Row-wise L2 normalisation in fp32, with no epsilon (as the reference)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class Selection:
    """Output of the select op (``VisionDropSelect``): dominant tokens and the rest, in index order."""

    dominant: Tensor  # [B, k, D]
    rest_tokens: Tensor  # [B, N - k, D]
    rest_metric: Tensor  # [B, N - k, M], as given (not normalised)
    kept_index: Tensor  # [B, k]
    rest_index: Tensor  # [B, N - k]


def select(scores: Tensor, tokens: Tensor, metric: Tensor, k: int) -> Selection:
    """The select op: top-``k`` tokens by ``scores`` [B, N] (ties: lower index), index order kept."""
    order = topk_order(scores, k)
    kept_index, rest_index = order[:, :k], order[:, k:]
    return Selection(
        gather_rows(tokens, kept_index), gather_rows(tokens, rest_index), gather_rows(metric, rest_index),
        kept_index, rest_index,
    )


def member_similarity(rest_metric: Tensor, c: int) -> Tensor:
    """Cosine similarity [B, R - c, c] of every member (non-target rest token) to every target."""
    rest_metric = l2_normalize(rest_metric)
    members = member_positions(rest_metric.shape[1], c, rest_metric.device)
    targets = rest_metric[:, target_positions(rest_metric.shape[1], c)]
    return rest_metric.index_select(1, members) @ targets.transpose(1, 2)


def slots_of(assignment: Tensor, num_rest: int, c: int) -> Tensor:
    """Contextual slot [B, R] of every remaining token (a target is its own slot), for traces."""
    slots = torch.empty((assignment.shape[0], num_rest), dtype=torch.int64, device=assignment.device)
    slots[:, target_positions(num_rest, c)] = torch.arange(c, device=assignment.device)
    return slots.index_copy(1, member_positions(num_rest, c, assignment.device), assignment.long())


@dataclass
class Merged:
    """Output of the merge op (``VisionDropMerge``)."""

    tokens: Tensor  # [B, c, D]: the contextual tokens, in target order
    assignment: Tensor  # [B, R - c]: each member's slot, members in rest order (int64; int32 from the plugin)


def merge(rest_tokens: Tensor, rest_metric: Tensor, c: int, assignment: Tensor | None = None) -> Merged:
    """The merge op (``VisionDropMerge``): fold ``R`` remaining tokens into ``c`` contextual ones.

    Targets sit at a uniform stride; every other token (a member) joins the target of highest
    cosine similarity (first target wins ties); a contextual token is the target's hidden
    state plus the mean of its members (count clamped at 1): target + mean, the reference's
    quirk. ``rest_metric`` is the raw merge metric; it is L2-normalised here. A given
    ``assignment`` replaces the argmax (validate replays another backend's choice with it).
    """
    num_rest = rest_tokens.shape[1]
    target_tokens = rest_tokens[:, target_positions(num_rest, c)]
    if assignment is None:
        assignment = member_similarity(rest_metric, c).argmax(-1)  # first maximum: the first target wins ties
    if num_rest == c:
        return Merged(target_tokens, assignment)
    members = member_positions(num_rest, c, rest_tokens.device)
    one_hot = (assignment.unsqueeze(-1) == torch.arange(c, device=assignment.device)).float()
    sums = one_hot.transpose(1, 2) @ rest_tokens.index_select(1, members).float()  # [B, c, D]
    counts = one_hot.sum(1).clamp_min(1.0).unsqueeze(-1)
    merged = target_tokens.float() + sums / counts
    return Merged(merged.to(rest_tokens.dtype), assignment)


def indicator(index: Tensor, length: int) -> Tensor:
    """[B, length] scores that are 1 at ``index`` [B, K] and 0 elsewhere: selecting top-K of them
    picks exactly ``index`` (how a forced choice goes through the ordinary select)."""
    return torch.zeros(index.shape[0], length, device=index.device).scatter(1, index.long(), 1.0)


def rms_scale(hidden: Tensor, eps: float) -> Tensor:
    """RMSNorm's per-token factor ``1 / sqrt(mean(x^2) + eps)`` in fp32 -> [B, N, 1]."""
    return torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + eps)


def prune(
    scores: Tensor, tokens: Tensor, metric: Tensor, k: int, c: int,
    ops: tuple | None = None, carried: tuple[Tensor, float] | None = None, forced: Choice | None = None,
) -> PruneResult:
    """One VisionDrop stage: top-``k`` dominant tokens, then ``c`` contextual ones.

    ``scores`` [B, N] (higher is kept), ``tokens`` [B, N, D], ``metric`` [B, N, M]. ``ops``
    is the (select, merge) pair: the reference math, or stand-ins that plugin-mode export
    traces into TensorRT plugin nodes (their forward calls these same functions).

    ``carried`` = (projections [B, N, P], rms_eps) carries the next layer's q/k/v projections
    (before RoPE) through the prune, so that layer need not recompute them: dominant rows
    are gathered with the tokens; a contextual token's projection follows exactly from its
    members', because RMSNorm is ``g * x * r(x)`` with a per-token scalar ``r`` and the
    projections are linear (no bias): ``u = p / r(x)`` merges like the hidden states
    (target + mean) and the merged token's projection is ``r(y) * u(y)``.

    ``forced`` replaces both decisions (which tokens are kept, which target each member
    joins) by given ones, computed with the reference ops: the rest is unchanged math.
    """
    select_op, merge_op = ops or REFERENCE_OPS
    if forced is not None:
        scores = indicator(forced.kept_index, scores.shape[1])
        select_op, merge_op = select, partial(merge, assignment=forced.assignment.long())
    width = tokens.shape[-1]
    if carried is not None:
        projections, eps = carried
        tokens = torch.cat([tokens, projections.to(tokens.dtype)], dim=-1)
    chosen = select_op(scores, tokens, metric, k)
    rest_index = chosen.rest_index.long()
    target_index = rest_index[:, target_positions(rest_index.shape[1], c)]
    if carried is None:
        merged = merge_op(chosen.rest_tokens, chosen.rest_metric, c)
        return PruneResult(torch.cat([chosen.dominant, merged.tokens], dim=1), chosen.kept_index.long(), target_index,
                           rest_index, merged.assignment.long())
    rest_hidden, rest_projections = chosen.rest_tokens[..., :width], chosen.rest_tokens[..., width:]
    unscaled = rest_projections.float() / rms_scale(rest_hidden, eps)
    merged = merge_op(torch.cat([rest_hidden.float(), unscaled], dim=-1), chosen.rest_metric, c)
    contextual = merged.tokens[..., :width].to(rest_hidden.dtype)
    contextual_projections = (merged.tokens[..., width:] * rms_scale(contextual, eps)).to(rest_projections.dtype)
    return PruneResult(
        torch.cat([chosen.dominant[..., :width], contextual], dim=1), chosen.kept_index.long(), target_index,
        rest_index, merged.assignment.long(), torch.cat([chosen.dominant[..., width:], contextual_projections], dim=1),
    )


REFERENCE_OPS = (select, merge)


def vision_scores(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """Stage-0 scores [B, N]: the CLS query's softmax attention summed over heads.

    ``query``/``key`` are [B, H, N, hd] with CLS at index 0. The CLS token scores +inf so
    that it is always among the kept tokens (``k`` counts it).
    """
    logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scale  # [B, H, 1, N]
    attention = logits.softmax(-1).sum(1)[:, 0]  # [B, N]
    cls = torch.full_like(attention[:, :1], float("inf"))
    return torch.cat([cls, attention[:, 1:]], dim=1)


def heads_mean_metric(key: Tensor) -> Tensor:
    """Merge metric: key vectors [B, H, N, hd] averaged over heads -> [B, N, hd]."""
    return key.float().mean(1)


def visual_positions(image_offset: Tensor, num_visual: int) -> Tensor:
    """Sequence positions [B, V] of the visual block that starts at ``image_offset`` [B]."""
    return image_offset.unsqueeze(-1) + torch.arange(num_visual, device=image_offset.device)


def llm_scores(visual_query: Tensor, key: Tensor, attention_mask: Tensor, positions: Tensor, scale: float) -> Tensor:
    """LLM-stage scores [B, V]: visual-to-visual attention of the next layer.

    ``visual_query`` [B, H, V, hd] (the visual rows) and ``key`` [B, H_kv, S, hd] are the next
    layer's RoPE-applied projections of the current sequence, ``attention_mask`` [B, S]
    (1 = real token) and ``positions`` [B, V] where the visual tokens sit. Visual queries
    attend to every key (causal + padding mask), softmax in fp32, mean over heads, visual key
    columns kept, mean over visual queries (masked entries count as zeros, as in the reference).
    """
    batch, kv_heads, seq, head_dim = key.shape
    heads = visual_query.shape[1]
    visual_query = visual_query.float()
    keys = key.float()[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, head_dim).reshape(batch, heads, seq, head_dim)
    logits = (visual_query @ keys.transpose(-1, -2)) * scale  # [B, H, V, S]
    key_index = torch.arange(seq, device=key.device)
    allowed = (key_index <= positions.unsqueeze(-1)) & attention_mask.bool().unsqueeze(1)
    bias = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill(~allowed, float("-inf"))
    attention = (logits + bias.unsqueeze(1)).softmax(-1).mean(1)  # [B, V, S]; the mask broadcasts over heads
    visual_columns = torch.gather(
        attention, 2, positions.unsqueeze(1).expand(-1, positions.shape[1], -1)
    )
    return visual_columns.mean(1)


def splice(sequence: Tensor, image_offset: Tensor, num_visual: int, visual: Tensor, dim: int = 1) -> Tensor:
    """Replace the ``num_visual``-long block at ``image_offset`` [B] by ``visual``.

    The sequence axis is ``dim``: 1 for [B, S] and [B, S, D] tensors, 2 for per-head
    [B, H, S, hd] ones. Per-sample offsets (left padding) make it one concat and one gather.
    """
    length, new_visual = sequence.shape[dim], visual.shape[dim]
    pos = torch.arange(length - num_visual + new_visual, device=sequence.device).unsqueeze(0)
    offset = image_offset.unsqueeze(-1)
    source = torch.where(
        pos < offset,
        pos,
        torch.where(pos < offset + new_visual, length + pos - offset, pos - new_visual + num_visual),
    )
    combined = torch.cat([sequence, visual], dim=dim)
    if combined.dim() == 2:
        return torch.gather(combined, 1, source)
    return gather_positions(combined, source) if dim == 2 else gather_rows(combined, source)

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
    merged = fold(target_tokens, rest_tokens.index_select(1, members), *merge_weights(assignment, c))
    return Merged(merged.to(rest_tokens.dtype), assignment)


def merge_weights(assignment: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """The merge as a linear map: which members [B, c, R - c] each contextual slot sums (one-hot,
    fp32) and how many [B, c, 1] (clamped at 1, so a lone target stays itself)."""
    one_hot = (assignment.unsqueeze(-1) == torch.arange(c, device=assignment.device)).float()
    return one_hot.transpose(1, 2), one_hot.sum(1).clamp_min(1.0).unsqueeze(-1)


def fold(targets: Tensor, members: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
    """Contextual tokens in fp32: each target plus the mean of its members (target + mean, the
    reference's quirk). ``weights``/``counts`` are :func:`merge_weights`'; any leading batch
    axes broadcast (per-head tensors pass them unsqueezed at the head axis)."""
    return targets.float() + (weights @ members.float()) / counts


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


@dataclass
class BlockPrune:
    """An LLM stage decided and merged where its block lies in the sequence (:func:`prune_block`)."""

    kept_positions: Tensor  # [B, k]: the dominant tokens' sequence positions, ascending
    contextual: Tensor  # [B, c, D]: the contextual hidden states, in target order
    contextual_projections: tuple[Tensor, ...]  # per projection [B, H, c, hd]: theirs, carried
    kept_index: Tensor  # [B, k], in the block's numbering (as PruneResult's)
    target_index: Tensor  # [B, c]
    assignment: Tensor  # [B, R - c]


def prune_block(
    scores: Tensor, metric: Tensor, hidden: Tensor, projections: tuple[Tensor, ...], positions: Tensor,
    k: int, c: int, rms_eps: float, forced: Choice | None = None,
) -> BlockPrune:
    """:func:`prune` with ``carried`` projections, on the sequence as it lies (reference ops only).

    ``hidden`` [B, S, D] and the per-head ``projections`` ([B, H, S, hd] each) are the whole
    sequence, ``positions`` [B, N] where its block sits, ``scores``/``metric`` the block's.
    The same decisions and the same sums as :func:`prune`, element for element, but no token
    is moved until the output needs it: the dominant ones stay where they are (the caller's
    :func:`splice` takes them from the sequence by ``kept_positions``), only targets and
    members are gathered, and each projection merges in its own per-head layout, so nothing is
    concatenated, split or transposed. :func:`prune` keeps the concatenated form for the
    plugin ops, which gather and merge it in one kernel.
    """
    if forced is not None:
        scores = indicator(forced.kept_index, scores.shape[1])
    order = topk_order(scores, k)
    kept_index, rest_index = order[:, :k], order[:, k:]
    num_rest = rest_index.shape[1]
    target_index = rest_index[:, target_positions(num_rest, c)]
    if forced is not None:
        assignment = forced.assignment.long()
    else:
        assignment = member_similarity(gather_rows(metric, rest_index), c).argmax(-1)
    targets = torch.gather(positions, 1, target_index)
    target_hidden = gather_rows(hidden, targets)
    # a projection p = r(x) * u with RMSNorm's per-token factor r: u merges like the hidden states
    scale = rms_scale(target_hidden, rms_eps).unsqueeze(1)
    unscaled = [gather_positions(p, targets).float() / scale for p in projections]
    contextual = target_hidden
    if num_rest > c:
        members = torch.gather(positions, 1, rest_index.index_select(1, member_positions(num_rest, c, rest_index.device)))
        weights, counts = merge_weights(assignment, c)
        member_hidden = gather_rows(hidden, members)
        member_scale = rms_scale(member_hidden, rms_eps).unsqueeze(1)
        contextual = fold(target_hidden, member_hidden, weights, counts).to(hidden.dtype)
        member_projections = [gather_positions(p, members) for p in projections]
        unscaled = [fold(u, m.float() / member_scale, weights.unsqueeze(1), counts.unsqueeze(1))
                    for u, m in zip(unscaled, member_projections, strict=True)]
    rescale = rms_scale(contextual, rms_eps).unsqueeze(1)
    return BlockPrune(
        torch.gather(positions, 1, kept_index), contextual,
        tuple((u * rescale).to(p.dtype) for u, p in zip(unscaled, projections, strict=True)),
        kept_index, target_index, assignment,
    )


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


SOFTMAX_FLOOR = 80.0  # how far below its row's maximum a masked logit sits (exp(-80) < 2e-35)


def llm_scores(visual_query: Tensor, key: Tensor, attention_mask: Tensor, positions: Tensor, scale: float) -> Tensor:
    """LLM-stage scores [B, V]: visual-to-visual attention of the next layer.

    ``visual_query`` [B, H, V, hd] (the visual rows) and ``key`` [B, H_kv, S, hd] are the next
    layer's RoPE-applied projections of the current sequence, ``attention_mask`` [B, S]
    (1 = real token) and ``positions`` [B, V] where the visual tokens sit. Visual queries
    attend to every key (causal + padding mask), softmax in fp32, mean over heads, visual key
    columns kept, mean over visual queries (masked entries count as zeros, as in the reference: here
    as shares under 2e-35, see below).
    """
    batch, kv_heads, seq, head_dim = key.shape
    heads = visual_query.shape[1]
    visual_query = visual_query.float()
    keys = key.float()[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, head_dim).reshape(batch, heads, seq, head_dim)
    logits = (visual_query @ keys.transpose(-1, -2)) * scale  # [B, H, V, S]
    key_index = torch.arange(seq, device=key.device)
    allowed = (key_index <= positions.unsqueeze(-1)) & attention_mask.bool().unsqueeze(1)
    bias = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill(~allowed, float("-inf"))
    logits = logits + bias.unsqueeze(1)  # the mask broadcasts over heads
    # Masked logits are raised to SOFTMAX_FLOOR below their row's maximum: each keeps a share
    # under 2e-35 of a sum that is at least 1, far below fp32's resolution of that sum, so the
    # unmasked probabilities come out as before (the masked ones ~1e-35 instead of 0; the
    # scores matched bit for bit in the exported graphs tried). ONNX Runtime's softmax takes
    # a slow path for arguments below about -87: 2.0 against 0.75 ms (max and floor included)
    # for a [16, 288, 337] block with a fifth of it masked, on this project's 2-core CPU.
    floor = logits.amax(-1, keepdim=True) - SOFTMAX_FLOOR
    attention = torch.maximum(logits, floor).softmax(-1).mean(1)  # [B, V, S]
    visual_columns = torch.gather(
        attention, 2, positions.unsqueeze(1).expand(-1, positions.shape[1], -1)
    )
    return visual_columns.mean(1)


def splice(sequence: Tensor, image_offset: Tensor, num_visual: int, visual: Tensor, dim: int = 1) -> Tensor:
    """Replace the ``num_visual``-long block at ``image_offset`` [B] by ``visual``.

    The sequence axis is ``dim``: 1 for [B, S] and [B, S, D] tensors, 2 for per-head
    [B, H, S, hd] ones. Per-sample offsets (left padding) make it one concat and one gather.
    """
    return spliced(sequence, visual, splice_source(image_offset, sequence.shape[dim], num_visual, visual.shape[dim]), dim)


def splice_source(
    image_offset: Tensor, length: int, num_visual: int, new_visual: int, kept: Tensor | None = None,
) -> Tensor:
    """:func:`splice`'s gather index [B, L']: where each output position comes from in the
    sequence followed by the ``new_visual`` appended rows. With ``kept`` [B, k] the new block
    opens with the sequence's own rows at those positions, taken by the same gather (never
    copied on their own). One index serves every tensor of a sequence (hidden states, q/k/v,
    mask), so a graph computes it once."""
    num_kept = 0 if kept is None else kept.shape[1]
    pos = torch.arange(length - num_visual + num_kept + new_visual, device=image_offset.device).unsqueeze(0)
    offset = image_offset.unsqueeze(-1)
    block = pos - offset  # the position within the new block
    appended = length + block - num_kept
    if kept is not None:
        in_kept = (block >= 0) & (block < num_kept)  # a Where, not a Clip: TensorRT's parser clips floats only
        appended = torch.where(in_kept, torch.gather(kept, 1, torch.where(in_kept, block, 0)), appended)
    return torch.where(
        pos < offset, pos, torch.where(block < num_kept + new_visual, appended, pos - num_kept - new_visual + num_visual),
    )


def spliced(sequence: Tensor, visual: Tensor, source: Tensor, dim: int = 1) -> Tensor:
    """``sequence`` with ``visual`` appended along ``dim``, gathered at :func:`splice_source`'s ``source``."""
    combined = torch.cat([sequence, visual], dim=dim)
    if combined.dim() == 2:
        return torch.gather(combined, 1, source)
    return gather_positions(combined, source) if dim == 2 else gather_rows(combined, source)


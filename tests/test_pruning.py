"""The batched pruning math against direct per-sample loops on random tensors."""

import pytest
import torch

from visiondrop_edge import pruning


def loop_topk(scores: list[float], k: int) -> list[int]:
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


@pytest.mark.parametrize("n, k", [(577, 42), (577, 252), (48, 30), (5, 5), (7, 1)])
def test_topk_order_matches_a_sort(n, k):
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(n * 31 + k))
    order = pruning.topk_order(scores, k)
    for b in range(3):
        kept = loop_topk(scores[b].tolist(), k)
        assert order[b, :k].tolist() == kept
        assert order[b, k:].tolist() == [i for i in range(n) if i not in kept]


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5]])
    assert pruning.topk_order(scores, 2)[0, :2].tolist() == [1, 3]
    assert pruning.topk_order(scores, 3)[0, :3].tolist() == [1, 2, 3]  # first of the three 2.0s
    assert pruning.topk_order(scores, 4)[0, :4].tolist() == [1, 2, 3, 4]
    flat = torch.zeros(1, 9)
    assert pruning.topk_order(flat, 4)[0].tolist() == list(range(9))


def loop_merge(tokens, metric, c):
    r = tokens.shape[0]
    stride = max(1, r // c)
    targets = list(range(0, r, stride))[:c]
    unit = [metric[i] / metric[i].norm() for i in range(r)]
    groups = {t: [] for t in targets}
    for i in range(r):
        if i in groups:
            continue
        sims = [float(unit[i] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(i)
    merged = torch.stack([tokens[t] + (sum(tokens[i] for i in g) / len(g) if g else 0) for t, g in groups.items()])
    slot = {i: targets.index(t) for t, g in groups.items() for i in g}
    return merged, targets, [slot[i] for i in range(r) if i not in targets]


@pytest.mark.parametrize("r, c", [(535, 6), (100, 24), (30, 5), (12, 12), (13, 4)])
def test_contextual_merge_is_target_plus_mean(r, c):
    gen = torch.Generator().manual_seed(r + c)
    tokens, metric = torch.randn(2, r, 32, generator=gen), torch.randn(2, r, 8, generator=gen)
    merged = pruning.merge(tokens, metric, c)
    assert merged.tokens.shape == (2, c, 32) and merged.assignment.shape == (2, r - c)
    for b in range(2):
        expected, targets, slots = loop_merge(tokens[b], metric[b], c)
        assert list(range(r))[pruning.target_positions(r, c)] == targets
        assert pruning.member_positions(r, c).tolist() == [i for i in range(r) if i not in targets]
        torch.testing.assert_close(merged.tokens[b], expected, rtol=1e-5, atol=1e-5)
        assert merged.assignment[b].tolist() == slots


def test_forced_choices_replay_exactly_what_they_say():
    """Forcing a stage's decisions (validate's replay of another backend's choice) gives the
    loop reference's result for those decisions, not the scores' own choice."""
    gen = torch.Generator().manual_seed(7)
    n, k, c = 40, 12, 4
    scores, tokens, metric = torch.rand(1, n, generator=gen), torch.randn(1, n, 16, generator=gen), torch.randn(1, n, 4, generator=gen)
    own = pruning.prune(scores, tokens, metric, k, c)
    kept = sorted(set(own.kept_index[0].tolist()) - {own.kept_index[0, 0].item()} | {own.rest_index[0, 0].item()})
    rest = [i for i in range(n) if i not in kept]
    members = [rest[m] for m in pruning.member_positions(len(rest), c).tolist()]
    assignment = torch.tensor([[m % c for m in range(len(members))]])
    forced = pruning.prune(scores, tokens, metric, k, c, forced=pruning.Choice(torch.tensor([kept]), assignment))
    assert forced.kept_index[0].tolist() == kept and forced.assignment.tolist() == assignment.tolist()
    targets = [rest[t] for t in range(len(rest))[pruning.target_positions(len(rest), c)]]
    assert forced.target_index[0].tolist() == targets
    expected = [tokens[0, t] + torch.stack([tokens[0, i] for i, a in zip(members, assignment[0]) if a == slot]).mean(0)
                for slot, t in enumerate(targets)]
    torch.testing.assert_close(forced.tokens[0], torch.stack([tokens[0, i] for i in kept] + expected))


def test_prune_keeps_counts_and_index_order():
    gen = torch.Generator().manual_seed(0)
    scores, tokens, metric = torch.rand(2, 200, generator=gen), torch.randn(2, 200, 16, generator=gen), torch.randn(2, 200, 4, generator=gen)
    result = pruning.prune(scores, tokens, metric, 30, 5)
    assert result.tokens.shape == (2, 35, 16)
    assert result.kept_index.shape == (2, 30) and result.target_index.shape == (2, 5)
    assert (result.kept_index.diff(dim=-1) > 0).all() and (result.target_index.diff(dim=-1) > 0).all()
    assert not set(result.kept_index[0].tolist()) & set(result.target_index[0].tolist())
    torch.testing.assert_close(result.tokens[:, :30], pruning.gather_rows(tokens, result.kept_index))


def test_splice_handles_per_sample_offsets():
    seq = torch.arange(2 * 10).view(2, 10)
    visual = torch.full((2, 3), -1)
    out = pruning.splice(seq, torch.tensor([2, 4]), 5, visual)
    assert out.tolist() == [[0, 1, -1, -1, -1, 7, 8, 9], [10, 11, 12, 13, -1, -1, -1, 19]]


@pytest.mark.parametrize("dim", [1, 2])
def test_splice_takes_kept_rows_from_the_sequence_then_the_new_ones(dim):
    """Per sample: text before, the kept block rows in the given order, the new rows, text after."""
    offsets, num_visual, kept = [2, 4], 5, [[3, 5], [8, 4]]
    seq = torch.arange(2 * 10).view(2, 10)
    visual = -torch.arange(1, 7).view(2, 3)
    expected = [row[:o] + [row[i] for i in keep] + extra + row[o + num_visual:]
                for row, o, keep, extra in zip(seq.tolist(), offsets, kept, visual.tolist())]
    if dim == 2:  # per-head [B, H, S, hd]: every head and feature moves with its position
        seq, visual = (t[:, None, :, None].expand(-1, 3, -1, 4) for t in (seq, visual))
    source = pruning.splice_source(torch.tensor(offsets), 10, num_visual, 3, kept=torch.tensor(kept))
    out = pruning.spliced(seq, visual, source, dim=dim)
    rows = out if dim == 1 else out[:, 1, :, 2]
    assert rows.tolist() == expected
    if dim == 2:
        assert (out == out[:, :1, :, :1]).all()


def test_vision_scores_always_keep_cls():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 20, 8, generator=gen), torch.randn(1, 4, 20, 8, generator=gen)
    scores = pruning.vision_scores(q, k, 8 ** -0.5)
    assert torch.isinf(scores[0, 0])
    expected = ((q[:, :, :1] @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1).sum(1)[0, 0, 1:]
    torch.testing.assert_close(scores[0, 1:], expected)
    assert pruning.topk_order(scores, 3)[0, 0] == 0


def test_llm_scores_are_causal_visual_to_visual():
    gen = torch.Generator().manual_seed(2)
    batch, heads, kv_heads, seq, hd = 1, 4, 2, 12, 8
    q, k = torch.randn(batch, heads, seq, hd, generator=gen), torch.randn(batch, kv_heads, seq, hd, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    offset, nvis = 3, 6
    positions = pruning.visual_positions(torch.tensor([offset]), nvis)
    scores = pruning.llm_scores(pruning.gather_positions(q, positions), k, mask, positions, hd ** -0.5)
    kk = k.repeat_interleave(2, dim=1)
    expected = []
    for j in range(nvis):
        total = 0.0
        for i in range(nvis):
            qi = offset + i
            for h in range(heads):
                logits = (q[0, h, qi] @ kk[0, h, : qi + 1].T) * hd ** -0.5
                total += logits.softmax(-1)[offset + j].item() if offset + j <= qi else 0.0
        expected.append(total / heads / nvis)
    torch.testing.assert_close(scores[0], torch.tensor(expected), rtol=1e-5, atol=1e-7)

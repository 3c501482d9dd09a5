"""Tie-aware judging of a candidate backend's decisions against the reference's.

Two correct backends that differ in the last bits of a score may rank a near-tied pair
differently. A different choice is a *tie*, not a failure, when it is a valid choice under
some scores within the measured error of this very run: if the candidate's scores are
``s' = s + e`` with ``|e| <= E`` (E measured as ``max |s' - s|`` for this stage and sample),
it can prefer token ``j`` over ``i`` although ``s_i > s_j`` only if ``s_i - s_j <= 2E``. So:

- kept tokens: the candidate's kept set ``K'`` is tie-equivalent iff
  ``max_{j not in K'} s_j - min_{i in K'} s_i <= 2E`` (the reference's scores ``s``);
- merge assignment: a member that joined target ``t'`` instead of the reference's ``t`` is
  tie-equivalent iff ``cos(m, t) - cos(m, t') <= 2E_cos``, cosines from the reference's
  merge metric, ``E_cos`` the measured error of the candidate's cosines (from its metric);
- greedy tokens: picking ``a'`` instead of the reference's ``a`` is tie-equivalent iff
  ``logit_a - logit_a' <= 2E_logits`` at that step.

No constant is involved: the bound is twice the error the candidate actually made on the
decision's input. Exact ties (gap 0) always pass; a genuine bug that swaps well-separated
tokens exceeds the bound and is named with its scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from visiondrop_edge import pruning


@dataclass
class Decision:
    """A decision where the candidate differs from the reference (a tie, or a mismatch)."""

    stage: str
    kind: str  # kept | assignment | token
    sample: int
    reference: list[int]  # kept: tokens the reference kept and the candidate dropped; else the reference's picks
    candidate: list[int]  # kept: tokens the candidate kept instead; else the candidate's picks
    gap: float  # how much better the reference's choice is, in the reference's own values
    bound: float  # 2 x the candidate's measured error on the decision's input
    members: list[int] | None = None  # assignment: the member tokens whose target differs
    values: str = ""  # the reference's scores of the tokens involved (for a mismatch message)

    @property
    def is_tie(self) -> bool:
        return bool(self.gap <= self.bound)

    def describe(self) -> str:
        what = {"kept": f"kept {self.candidate} instead of {self.reference}",
                "assignment": f"members {self.members} joined targets {self.candidate} instead of {self.reference}",
                "token": f"token {self.candidate} instead of {self.reference}"}[self.kind]
        verdict = "tie" if self.is_tie else "MISMATCH"
        return f"{verdict}: {self.stage} sample {self.sample}: {what}; gap {self.gap:.3g} vs bound {self.bound:.3g}{self.values}"

    def to_dict(self) -> dict:
        return {**asdict(self), "tie": self.is_tie}


def error_bound(reference: np.ndarray, candidate: np.ndarray) -> float:
    """``2 max |candidate - reference|`` over the entries finite in the reference; 0 when the
    candidate is non-finite where the reference is not (nothing can be excused then)."""
    finite = np.isfinite(reference)
    diff = np.abs(candidate[finite].astype(np.float64) - reference[finite].astype(np.float64))
    if diff.size == 0:
        return 0.0
    worst = float(diff.max())
    return 2.0 * worst if np.isfinite(worst) else 0.0


def _np64(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def boundary_gap(scores: Tensor, k: int) -> float:
    """The smallest gap, over samples, between the k-th and (k+1)-th reference scores: how close
    the stage came to a tie (CLS's +inf ranks first and is excluded)."""
    ranked = torch.sort(scores.double(), dim=-1, descending=True).values
    gaps = ranked[:, k - 1] - ranked[:, k]
    finite = torch.isfinite(gaps)
    return float(gaps[finite].min()) if k < scores.shape[1] and finite.any() else float("inf")


def judge_kept(stage: str, ref_scores: Tensor, cand_scores: Tensor, cand_kept: Tensor) -> list[Decision]:
    """Every sample whose candidate kept set differs from the reference's own top-k."""
    k = cand_kept.shape[1]
    own = pruning.topk_order(ref_scores.float(), k)[:, :k]
    decisions = []
    for b in range(cand_kept.shape[0]):
        ours, theirs = set(cand_kept[b].tolist()), set(own[b].tolist())
        if ours == theirs:
            continue
        scores = _np64(ref_scores[b])
        inside = np.zeros(scores.shape[0], dtype=bool)
        inside[sorted(ours)] = True
        gap = float(scores[~inside].max() - scores[inside].min()) if inside.any() and (~inside).any() else float("inf")
        dropped, added = sorted(theirs - ours), sorted(ours - theirs)
        values = f" (scores: dropped {[f'{scores[i]:.6g}' for i in dropped]}, kept {[f'{scores[i]:.6g}' for i in added]})"
        bound = error_bound(scores, _np64(cand_scores[b]))
        decisions.append(Decision(stage, "kept", b, dropped, added, gap if np.isfinite(gap) else float("inf"), bound,
                                  values=values))
    return decisions


def judge_assignment(
    stage: str, ref_metric: Tensor, cand_metric: Tensor, cand_kept: Tensor, cand_assignment: Tensor, c: int
) -> list[Decision]:
    """Members whose target differs from the reference's argmax, given the candidate's kept set.

    Both metrics are [B, N, M]; the rest set is the candidate's (so a kept-set tie does not
    count twice), and cosines are computed with ``pruning.member_similarity``.
    """
    n = ref_metric.shape[1]
    decisions = []
    for b in range(cand_kept.shape[0]):
        kept = set(cand_kept[b].tolist())
        rest = torch.tensor([i for i in range(n) if i not in kept], dtype=torch.int64)
        if rest.numel() == c:
            continue
        ref_sim = pruning.member_similarity(ref_metric[b:b + 1, rest], c)[0]
        cand_sim = pruning.member_similarity(cand_metric[b:b + 1, rest], c)[0]
        own = ref_sim.argmax(-1)
        theirs = cand_assignment[b].long()
        differ = (own != theirs).nonzero().flatten().tolist()
        if not differ:
            continue
        rows = torch.arange(ref_sim.shape[0])
        gaps = (ref_sim[rows, own] - ref_sim[rows, theirs.clamp(0, c - 1)]).double()
        gaps[(theirs < 0) | (theirs >= c)] = float("inf")  # an out-of-range slot is never a tie
        members = pruning.member_positions(rest.numel(), c)
        targets = rest[pruning.target_positions(rest.numel(), c)]
        token = [int(rest[members[m]]) for m in differ]
        decisions.append(Decision(
            stage, "assignment", b, [int(targets[own[m]]) for m in differ],
            [int(targets[theirs[m]]) if 0 <= theirs[m] < c else int(theirs[m]) for m in differ],
            float(gaps[differ].max()), error_bound(_np64(ref_sim), _np64(cand_sim)), members=token,
        ))
    return decisions


def judge_token(stage: str, sample: int, ref_logits: Tensor, cand_logits: Tensor, ref_token: int, cand_token: int) -> Decision:
    """A greedy step where the candidate picked another token than the reference."""
    ref = _np64(ref_logits)
    gap = float(ref[ref_token] - ref[cand_token]) if 0 <= cand_token < ref.shape[0] else float("inf")
    return Decision(stage, "token", sample, [ref_token], [cand_token], gap, error_bound(ref, _np64(cand_logits)),
                    values=f" (reference logits {ref[ref_token]:.6g} vs {ref[cand_token]:.6g})" if np.isfinite(gap) else "")

"""Tie-aware validation: ties pass and are listed, mismatches and numeric bugs after a tie fail.

Candidates here are correct-by-construction backends with one known deviation (a score error
of a chosen size, a different tie-break, a swapped token, a corrupted merged token), built
over the PyTorch units; validate knows nothing about them but the Backend interface.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.loading import apply_precision
from visiondrop_edge.runtime.ties import error_bound, judge_assignment, judge_kept, judge_token
from visiondrop_edge.runtime.validate import validate_artifacts
from visiondrop_edge.contract import STAGE_OUTPUTS
from visiondrop_edge.runtime.base import DelegatingBackend, StageTrace
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge import pruning
from visiondrop_edge.schedule import Schedule

BUDGET = 64


# ------------------------------------------------------------------ the judge on plain numbers
def test_judge_kept_bound_is_twice_the_measured_score_error():
    ref = torch.tensor([[5.0, 4.0, 3.0, 2.9, 1.0]])
    cand_kept = torch.tensor([[0, 1, 3]])  # swapped 2 (3.0) for 3 (2.9): gap 0.1
    near = ref + torch.tensor([[0.0, 0.0, -0.06, 0.06, 0.0]])  # error 0.06: bound 0.12 >= 0.1
    far = ref + torch.tensor([[0.0, 0.0, -0.04, 0.04, 0.0]])  # error 0.04: bound 0.08 < 0.1
    [tie] = judge_kept("s", ref, near, cand_kept)
    assert tie.is_tie and tie.reference == [2] and tie.candidate == [3]
    assert tie.gap == pytest.approx(0.1) and tie.bound == pytest.approx(0.12)
    [mismatch] = judge_kept("s", ref, far, cand_kept)
    assert not mismatch.is_tie and "3" in mismatch.values and "2.9" in mismatch.values
    assert judge_kept("s", ref, ref, torch.tensor([[1, 0, 2]])) == []  # same set, other order: no decision


def test_exact_ties_pass_with_zero_error_and_inf_never_moves():
    ref = torch.tensor([[float("inf"), 2.0, 2.0, 1.0]])
    [tie] = judge_kept("s", ref, ref.clone(), torch.tensor([[0, 2]]))  # the other 2.0
    assert tie.is_tie and tie.gap == 0.0 and tie.bound == 0.0
    [cls_dropped] = judge_kept("s", ref, ref.clone(), torch.tensor([[1, 2]]))
    assert not cls_dropped.is_tie
    assert error_bound(ref.numpy(), torch.tensor([[float("nan"), 2.0, 2.0, 1.0]]).numpy()) == 0.0


def test_judge_assignment_uses_the_metric_cosines():
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(1, 12, 4, generator=gen)
    kept, c = torch.tensor([[0, 1]]), 3
    rest = torch.arange(2, 12).unsqueeze(0)
    similarity = pruning.member_similarity(pruning.gather_rows(metric, rest), c)[0]
    own = similarity.argmax(-1)
    assert judge_assignment("s", metric, metric, kept, own.unsqueeze(0), c) == []
    runner_up = similarity.argsort(-1, descending=True)[:, 1]
    member = int((similarity.max(-1).values - similarity[torch.arange(len(own)), runner_up]).argmin())
    moved = own.clone()
    moved[member] = runner_up[member]
    [decision] = judge_assignment("s", metric, metric, kept, moved.unsqueeze(0), c)
    assert not decision.is_tie and decision.bound == 0.0  # no measured error: only exact ties pass
    noisy = metric + 0.5 * torch.randn(metric.shape, generator=gen)
    [excused] = judge_assignment("s", metric, noisy, kept, moved.unsqueeze(0), c)
    assert excused.bound > decision.gap and excused.is_tie


def test_judge_token_gap_is_the_reference_logit_difference():
    ref = torch.tensor([1.0, 3.0, 2.99, -1.0], dtype=torch.float64)
    assert not judge_token("t", 0, ref, ref.clone(), 1, 2).is_tie  # no error: only an exact tie would pass
    flipped = ref + torch.tensor([0.0, -0.006, 0.006, 0.0], dtype=torch.float64)
    decision = judge_token("t", 0, ref, flipped, 1, 2)
    assert decision.is_tie and decision.gap == pytest.approx(0.01) and decision.bound == pytest.approx(0.012)


# ------------------------------------------------------------------ validate with known candidates
def _named(outputs) -> dict:
    """A unit's outputs by name (vision: a dict; prune: a PruneOutputs)."""
    return dict(outputs) if isinstance(outputs, dict) else outputs._asdict()


class Deviating(DelegatingBackend):
    """A PyTorch backend that, at one stage, ranks by deviated scores and decides from them.

    Its choices are always valid for the scores it reports; everything else is the reference
    math on those choices, unless ``tamper`` corrupts an output afterwards.
    """

    def __init__(self, inner: TorchBackend, stage: int, deviate, tamper=None, higher_index_wins: bool = False):
        super().__init__(inner, "deviating")
        self.stage, self.deviate, self.tamper, self.higher_index_wins = stage, deviate, tamper, higher_index_wins

    def _decide(self, stage: int, call):
        outputs = call()
        if stage != self.stage:
            return outputs
        named = _named(outputs)
        trace = StageTrace(**{name: named[name] for name in STAGE_OUTPUTS})
        scores = self.deviate(trace.scores)
        k, c = trace.kept_index.shape[1], self.spec.schedule.stages[stage].contextual
        ranked = scores.flip(-1) if self.higher_index_wins else scores
        kept = pruning.topk_order(ranked, k)[:, :k]
        if self.higher_index_wins:
            kept = (scores.shape[1] - 1 - kept).sort(-1).values
        rest = pruning.topk_order(pruning.indicator(kept, scores.shape[1]), k)[:, k:]
        assignment = pruning.member_similarity(pruning.gather_rows(trace.merge_metric, rest), c).argmax(-1)
        self.inner.forced = {stage: pruning.Choice(kept, assignment)}
        try:
            named = _named(call())
        finally:
            self.inner.forced = {}
        named["scores"] = scores
        named = self.tamper(named) if self.tamper else named
        return named if isinstance(outputs, dict) else type(outputs)(**named)

    def run_vision(self, pixel_values):
        return self._decide(0, lambda: self.inner.run_vision(pixel_values))

    def run_prune(self, stage, *inputs):
        return self._decide(stage + 1, lambda: self.inner.run_prune(stage, *inputs))



def boundary(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row: the lowest-ranked kept token and the highest-ranked dropped one."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, k - 1], order[:, k]


def swap_boundary(scale: float, k: int):
    """Move the boundary pair towards each other by ``scale`` x their gap, each (so they swap
    when scale > 0.5): a score error of exactly scale x gap."""
    def deviate(scores: Tensor) -> Tensor:
        last, first = boundary(scores, k)
        rows = torch.arange(scores.shape[0])
        gap = scores[rows, last] - scores[rows, first]
        out = scores.clone()
        out[rows, last] -= scale * gap
        out[rows, first] += scale * gap
        return out
    return deviate


def narrow_boundary(monkeypatch, stage: int, k: int, fraction: float) -> None:
    """Make the reference's own scores at ``stage`` near-tied: the first dropped token scores
    ``fraction x max |score|`` below the last kept one (0: an exact tie), on every backend
    built over the PyTorch units (the patched function is what they call)."""
    name = "vision_scores" if stage == 0 else "llm_scores"
    original = getattr(pruning, name)

    def narrowed(*args):
        scores = original(*args).clone()
        last, first = boundary(scores, k)
        rows = torch.arange(scores.shape[0])
        scale = scores.masked_fill(~torch.isfinite(scores), 0).abs().amax(-1)
        low, high = torch.minimum(last, first), torch.maximum(last, first)
        scores[rows, high] = scores[rows, low] - fraction * scale
        return scores

    monkeypatch.setattr(pruning, name, narrowed)


@pytest.fixture(scope="module")
def fp32_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ties") / f"tiny-{BUDGET}"
    export_artifacts(tiny, Schedule.from_budget(BUDGET, 8, 576), folder, ExportOptions())
    return folder


@pytest.fixture
def inner(tiny):
    return TorchBackend(tiny, Schedule.from_budget(BUDGET, 8, 576))


def run(folder, candidate):
    return validate_artifacts(folder, batch_sizes=(2,), new_tokens=4, seed=11, candidate=candidate)


@pytest.mark.parametrize("stage", [0, 2])  # the vision stage and the second LLM stage
def test_near_tie_just_inside_the_bound_passes_and_is_listed(fp32_folder, inner, stage, monkeypatch):
    """A reference gap of 5e-5 x the scores' scale: the error that makes the candidate swap
    (0.55 x that) stays inside fp32's 1e-4 tensor gate, and the gap is hundreds of fp32 ulps
    of the scores, so no CPU's last bit decides the outcome."""
    k = inner.spec.schedule.stages[stage].dominant
    narrow_boundary(monkeypatch, stage, k, 5e-5)
    report = run(fp32_folder, Deviating(inner, stage, swap_boundary(0.55, k)))  # error 0.55 gap: bound 1.1 gap
    assert report.passed, [c.detail for c in report.checks.values() if not c.passed]
    kept_ties = [d for d in report.ties if d.kind == "kept"]
    assert kept_ties and all(d.gap <= d.bound < 1.2 * d.gap for d in kept_ties)
    assert report.to_dict()["ties"] and not report.to_dict()["mismatches"]


def test_swap_beyond_the_measured_error_is_a_named_mismatch(fp32_folder, inner, monkeypatch):
    """Scores off by 0.45 x the gap each (a bound of 0.9 x the gap) cannot excuse swapping the
    boundary pair: the candidate reports those scores but swaps anyway."""
    k = inner.spec.schedule.stages[0].dominant
    narrow_boundary(monkeypatch, 0, k, 5e-5)  # a known gap, far above fp32's last bits
    honest = swap_boundary(0.45, k)

    def swap_kept(outputs):
        scores = outputs["scores"]
        last, first = boundary(scores, k)  # of its own scores: the order did not change
        kept = outputs["kept_index"].clone()
        kept[kept == last.unsqueeze(-1)] = first
        outputs["kept_index"] = kept.sort(-1).values
        return outputs

    assert run(fp32_folder, Deviating(inner, 0, honest)).passed  # the honest candidate alone is fine
    report = run(fp32_folder, Deviating(inner, 0, honest, tamper=swap_kept))
    assert not report.passed
    named = [d for d in report.decisions if d.stage == "vision_encoder" and d.kind == "kept"]
    assert named and all(not d.is_tie and 0.85 * d.gap < d.bound < d.gap for d in named)


def test_exact_tie_passes_with_either_index(fp32_folder, inner, monkeypatch):
    """Two tokens with equal reference scores: the reference keeps the lower index, a backend
    breaking ties the other way keeps the higher one; no score error at all, still a tie."""
    narrow_boundary(monkeypatch, 0, inner.spec.schedule.stages[0].dominant, 0.0)
    report = run(fp32_folder, Deviating(inner, 0, lambda s: s, higher_index_wins=True))
    assert report.passed, [c.detail for c in report.checks.values() if not c.passed]
    exact = [d for d in report.ties if d.kind == "kept" and d.stage == "vision_encoder"]
    assert exact and all(d.gap == 0.0 and d.bound == 0.0 for d in exact)
    assert all(d.candidate[0] > d.reference[0] for d in exact)  # the higher index of the tied pair


def test_swap_with_a_large_gap_fails_and_names_the_tokens(fp32_folder, inner):
    """A backend that keeps the worst token instead of the best (scores reported truthfully)."""
    k = inner.spec.schedule.stages[1].dominant

    def swap_best_and_worst(outputs):
        kept = outputs["kept_index"].clone()
        scores = outputs["scores"]
        best = scores.gather(1, kept).argmax(-1)
        dropped = pruning.topk_order(pruning.indicator(kept, scores.shape[1]), k)[:, k:]
        worst = dropped.gather(1, scores.gather(1, dropped).argmin(-1, keepdim=True))[:, 0]
        rows = torch.arange(kept.shape[0])
        expected[:] = list(zip(kept[rows, best].tolist(), worst.tolist()))
        kept[rows, best] = worst
        outputs["kept_index"] = kept.sort(-1).values
        return outputs

    expected: list = []
    report = run(fp32_folder, Deviating(inner, 1, lambda s: s, tamper=swap_best_and_worst))
    assert not report.passed
    assert not report.checks["prune_0.decisions (kept, assignment)"].passed
    named = [d for d in report.decisions if d.stage == "prune_0" and d.kind == "kept"]
    assert named and not any(d.is_tie for d in named)
    assert {(d.reference[0], d.candidate[0]) for d in named} == set(expected)
    assert "MISMATCH" in report.checks["prune_0.decisions (kept, assignment)"].detail


def test_a_wrong_merged_token_after_a_genuine_tie_still_fails(fp32_folder, inner, monkeypatch):
    """After a legitimate near-tie, the candidate corrupts one contextual token by 1%: the
    comparison with the reference re-run on the candidate's choices catches it."""
    stage = inner.spec.schedule.stages[0]
    narrow_boundary(monkeypatch, 0, stage.dominant, 5e-5)

    def corrupt_contextual(outputs):
        embeds = outputs["image_embeds"].clone()
        embeds[:, stage.dominant] *= 1.01
        outputs["image_embeds"] = embeds
        return outputs

    clean = run(fp32_folder, Deviating(inner, 0, swap_boundary(0.55, stage.dominant)))
    assert clean.passed and [d for d in clean.ties if d.stage == "vision_encoder"]
    report = run(fp32_folder, Deviating(inner, 0, swap_boundary(0.55, stage.dominant), tamper=corrupt_contextual))
    assert [d for d in report.ties if d.stage == "vision_encoder"]  # the tie is still a tie
    assert not report.passed and not report.checks["vision_encoder.image_embeds"].passed


# ------------------------------------------------------------------ fp16 on ONNX Runtime, any CPU
@pytest.mark.parametrize("plugins", [False, True], ids=["portable", "plugins"])
@pytest.mark.parametrize("budget", [32, 64, 128, 192])
def test_fp16_artifacts_validate_on_any_cpu(tmp_path, budget, plugins, tiny_half):
    """Whatever fp16 kernels this CPU has: flipped near-ties are listed as ties, and the strict
    comparisons after them (reference re-run on the candidate's choices) still pass."""
    out = tmp_path / "fp16"
    export_artifacts(tiny_half, Schedule.from_budget(budget, 8, 576), out, ExportOptions(dtype="fp16", plugins=plugins))
    report = validate_artifacts(out, batch_sizes=(1, 2), new_tokens=8, seed=budget)
    assert report.passed, [(c.name, c.detail) for c in report.checks.values() if not c.passed]
    assert report.gates["relative"] == 3e-2 and report.gates["decisions"] == "tie-aware"
    assert all(c.gated for c in report.checks.values())  # fp16 end to end is gated too, tie-aware
    assert all(d.is_tie for d in report.decisions)


def test_mixed_precision_policy_keeps_the_vision_stage_in_fp32(tmp_path, tiny_half):
    """--dtype fp16 --vision-dtype fp32: CLIP and the stage-0 prune in fp32, the rest fp16."""
    from visiondrop_edge.manifest import read_manifest

    out = tmp_path / "mixed"
    loaded = apply_precision(tiny_half, "fp32")
    try:
        export_artifacts(loaded, Schedule.from_budget(BUDGET, 8, 576), out, ExportOptions(dtype="fp16", vision_dtype="fp32"))
    finally:
        apply_precision(tiny_half, "fp16")
    manifest = read_manifest(out)
    assert manifest.export["vision_dtype"] == "fp32" and manifest.spec["vision_dtype"] == "float32"
    vision = manifest.graph("vision")
    types = {v["name"]: v["dtype"] for v in vision.inputs + vision.outputs}
    assert types["pixel_values"] == "float32" and types["scores"] == "float32" and types["image_embeds"] == "float16"
    report = validate_artifacts(out, batch_sizes=(2,), new_tokens=4, seed=2)
    assert report.passed
    assert report.checks["vision_encoder.scores"].max_rel_err < 1e-4  # fp32 scoring: fp32-size errors

"""``validate``: prove that a candidate backend computes what the PyTorch reference computes.

Two kinds of comparison, on fresh random images (and any the user gives):

- per unit: the reference's run is recorded and every candidate unit (graph, engine) is fed
  the very inputs its reference unit saw (prefill and the first decode step), so an error is
  pinned to one unit instead of snowballing;
- end to end: greedy generation on the candidate against the reference: every step's
  logits, and the token ids.

Float tensors go through Polygraphy's comparators (max absolute difference, cosine
similarity) with the tool's own gates for the folder's precision (``visiondrop_edge/gates.py``):
``max |ours - ref| <= relative * max |ref|`` and ``cosine >= 0.99``. Decisions (kept and
target indices, merge assignments, greedy tokens) are judged tie-aware (``runtime/ties.py``):
a different choice passes only when it is valid under the error the candidate measurably
made on that decision's input, and everything downstream of it is then compared with the
reference re-run on the candidate's choices, with the same strict gates. The recorder and
the comparison only see the :class:`runtime.base.Backend` interface: any backend pair works.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from visiondrop_edge.contract import NEW_KV, STAGE_OUTPUTS, bind
from visiondrop_edge.errors import UserError
from visiondrop_edge.gates import Gates, gates_for
from visiondrop_edge.loading import EXPORT_DTYPES, apply_precision, load_model
from visiondrop_edge.manifest import Manifest, read_manifest
from visiondrop_edge.prompt import build_prompts, image_sizes, load_images, pixel_values, random_images

from .base import Backend, DecoderState, DelegatingBackend, StageTrace
from .generate import GenerationResult, greedy_generate
from .torch_backend import TorchBackend
from .ties import Decision, boundary_gap, error_bound, judge_assignment, judge_kept, judge_token

DEFAULT_PROMPTS = ("What is in this image?", "Describe the scene in one long and detailed sentence, please.")
FLOAT_GROUPS = {"query": "q/k/v", "key": "q/k/v", "value": "q/k/v",
                "pruned_query": "pruned q/k/v", "pruned_key": "pruned q/k/v", "pruned_value": "pruned q/k/v"}
CANDIDATES = ("ort", "ort-cuda", "trt")
REFERENCES = ("torch",)


@dataclass
class Check:
    """One row of the report; errors are the worst over every case that fed it."""

    name: str
    kind: str  # tensor | exact | decision
    gated: bool = True  # False: reported only
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max |a - b| / max |b|
    cosine: float = 1.0  # worst cosine similarity
    passed: bool = True
    ties: int = 0  # decisions that differ from the reference's within their bound
    detail: str = ""

    def note(self, passed: bool, detail: str = "") -> None:
        self.passed &= passed
        parts = [p for p in self.detail.split("; ") if p]
        parts += [p for p in detail.split("; ") if p and p not in parts]
        self.detail = "; ".join(parts)


@dataclass
class TensorResult:
    """Polygraphy's numbers for one float tensor, the gates it was judged by, and the verdicts."""

    max_abs_err: float
    max_rel_err: float
    cosine: float
    relative_gate: float  # inf: not gated
    cosine_gate: float
    relative_ok: bool
    cosine_ok: bool


@dataclass
class Report:
    artifacts: str
    model: str
    schedule: str
    precision: str
    reference: str
    candidate: str
    gates: dict
    cases: list[dict] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)  # every tie (and mismatch) found
    margins: dict[str, dict] = field(default_factory=dict)  # per stage: closest reference gap vs the bound

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values() if c.gated)

    @property
    def ties(self) -> list[Decision]:
        return [d for d in self.decisions if d.is_tie]

    def check(self, name: str, kind: str = "tensor", gated: bool = True) -> Check:
        return self.checks.setdefault(name, Check(name, kind, gated))

    def add_tensor(self, name: str, result: TensorResult, gated: bool = True) -> None:
        row = self.check(name, gated=gated)
        row.max_abs_err = max(row.max_abs_err, result.max_abs_err)
        row.max_rel_err = max(row.max_rel_err, result.max_rel_err)
        row.cosine = min(row.cosine, result.cosine)
        failed = [f"rel err {result.max_rel_err:.3g} > {result.relative_gate:g}"] if not result.relative_ok else []
        failed += [f"cosine {result.cosine:.6f} < {result.cosine_gate:g}"] if not result.cosine_ok else []
        row.note(not failed, "; ".join(failed))

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("checks", "decisions")}  # margins included
        return {**data, "passed": self.passed, "checks": [asdict(c) for c in self.checks.values()],
                "ties": [d.to_dict() for d in self.ties],
                "mismatches": [d.to_dict() for d in self.decisions if not d.is_tie]}


class RecordingBackend(DelegatingBackend):
    """Wraps a backend and records every unit call with its phase, for replay elsewhere."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.calls: list[tuple[str, str, int, tuple, tuple]] = []  # phase, role, index, inputs, outputs
        self.phase = "prefill"
        self.decode_steps = 0

    def _record(self, role: str, index: int, inputs: tuple, outputs):
        self.calls.append((self.phase, role, index, inputs, outputs))
        return outputs

    def run_vision(self, pixel_values):
        return self._record("vision", 0, (pixel_values,), self.inner.run_vision(pixel_values))

    def run_qkv(self, hidden_states):
        return self._record("qkv", 0, (hidden_states,), self.inner.run_qkv(hidden_states))

    def run_prune(self, stage, *inputs):
        return self._record("prune", stage, inputs, self.inner.run_prune(stage, *inputs))

    def run_group(self, group, *inputs):
        results = self.inner.run_group(group, *inputs)
        self._record("decoder", group, inputs[:6] + tuple(inputs[6]), group_outputs(*results))
        return results

    def decode_step(self, tokens: Tensor, state: DecoderState):
        self.phase = f"decode[{self.decode_steps}]"
        self.decode_steps += 1
        return super().decode_step(tokens, state)


def _np(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return np.ascontiguousarray((t.float() if t.is_floating_point() else t).numpy())


def compare_tensors(
    ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], gates: Gates, relative: float | None = None
) -> dict[str, TensorResult]:
    """Polygraphy's simple comparator (absolute tolerance ``relative * max |ref|``, so the gate is
    exactly the scale-relative one; ``gates.relative`` unless given) and its cosine-similarity
    comparator, per output."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import CosineSimilarityCompareFunc, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    ref, ours = {n: r.copy() for n, r in ref.items()}, {n: ours[n].copy() for n in ref}
    for name, r in ref.items():  # equal infinities (the CLS score) agree; zero them for the statistics
        same_inf = ~np.isfinite(r) & (r == ours[name])
        r[same_inf] = ours[name][same_inf] = 0.0
    scale = {name: float(np.abs(r[np.isfinite(r)]).max(initial=0.0)) for name, r in ref.items()}
    relative = relative if relative is not None else gates.relative if gates.relative is not None else np.inf
    results = RunResults([
        ("reference", [IterationResult(ref, runner_name="reference")]),
        ("candidate", [IterationResult(ours, runner_name="candidate")]),
    ])
    G_LOGGER.colors = False
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        simple = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            atol={n: relative * s for n, s in scale.items()}, rtol={"": 0.0}, check_error_stat="max",
            infinities_compare_equal=True))[0][("reference", "candidate")][0]
        cosine = Comparator.compare_accuracy(results, compare_func=CosineSimilarityCompareFunc(
            cosine_similarity_threshold={"": gates.cosine}))[0][("reference", "candidate")][0]
    out = {}
    for name in ref:
        abs_err = float(simple[name].max_absdiff)
        out[name] = TensorResult(abs_err, abs_err / scale[name] if scale[name] else abs_err,
                                 float(cosine[name].cosine_similarity), relative, gates.cosine,
                                 bool(simple[name]), bool(cosine[name]))
    return out


def group_outputs(out: Tensor, next_qkv, new_key_values: list[Tensor]) -> tuple[Tensor, ...]:
    """A :meth:`Backend.run_group` result as the graph's outputs, in the contract's order."""
    return (out, *(next_qkv or ()), *new_key_values)


def by_name(names: Sequence[str], outputs) -> dict[str, Tensor]:
    """A unit's outputs keyed by the manifest's names: a backend's dict or typed result, or a
    decoder group's :func:`group_outputs` in the contract's order."""
    if isinstance(outputs, dict):
        named = outputs
    elif hasattr(outputs, "_asdict"):
        named = outputs._asdict()
    else:
        named = bind(names, outputs)
    if set(named) != set(names):
        raise ValueError(f"outputs {sorted(named)} do not match the manifest's {sorted(names)}")
    return named


def _stage_trace(outputs: dict[str, Tensor]) -> StageTrace:
    return StageTrace(**{name: outputs[name] for name in STAGE_OUTPUTS})


def judge_stage(label: str, ref: StageTrace, cand: StageTrace, contextual: int) -> list[Decision]:
    """The candidate's kept set and merge assignment against the reference's scores and metric."""
    return (judge_kept(label, ref.scores, cand.scores, cand.kept_index)
            + judge_assignment(label, ref.merge_metric, cand.merge_metric, cand.kept_index, cand.assignment, contextual))


class Validator:
    """Compares ``candidate`` with ``reference`` (a :class:`TorchBackend`) under ``gates``."""

    def __init__(self, reference: TorchBackend, candidate: Backend, manifest: Manifest, report: Report, gates: Gates):
        self.reference, self.candidate, self.manifest, self.report, self.gates = reference, candidate, manifest, report, gates
        self.stages = reference.spec.schedule.stages

    def judged(self, stage: int, trace: StageTrace) -> StageTrace:
        """A stage's choices as its top-k and merge made them: a multi-crop image's vision stage
        prunes each view alone, so it is judged one view per row, in the view's own numbering."""
        schedule = self.reference.spec.schedule
        if stage != 0 or schedule.views == 1:
            return trace
        rows, views = trace.kept_index.shape[0], schedule.views

        def own(index: Tensor, per_view: int) -> Tensor:
            offsets = torch.arange(views, device=index.device).view(1, -1, 1) * per_view
            return (index.view(rows, views, -1) - offsets).flatten(0, 1)

        tokens = schedule.vision_inputs
        return StageTrace(own(trace.kept_index, tokens), own(trace.target_index, tokens), trace.scores.reshape(rows * views, tokens),
                          own(trace.assignment, schedule.vision.contextual), trace.merge_metric.reshape(rows * views, tokens, -1))

    @contextmanager
    def forcing(self, choices: dict) -> Iterator[None]:
        self.reference.forced = choices
        try:
            yield
        finally:
            self.reference.forced = {}

    def compare_outputs(self, label: str, names: Sequence[str], ours: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
        """Float outputs through the comparators, integer outputs exactly."""
        pairs = [(name, ours[name], ref[name]) for name in names]
        floats = {n: _np(r) for n, _, r in pairs if r.is_floating_point()}
        results = compare_tensors({n: _np(o) for n, o, _ in pairs if n in floats}, floats, self.gates) if floats else {}
        for name, o, r in pairs:
            if name in floats:
                group = f"KV ({NEW_KV}.*)" if name.startswith(f"{NEW_KV}.") else FLOAT_GROUPS.get(name, name)
                self.report.add_tensor(f"{label}.{group}", results[name])
                continue
            if o.shape != r.shape:
                self.report.check(f"{label}.{name}", "exact").note(False, f"shape {list(o.shape)} vs {list(r.shape)}")
                continue
            equal = torch.equal(o.cpu().long(), r.cpu().long())
            self.report.check(f"{label}.{name}", "exact").note(equal, "" if equal else "values differ")

    def record_decisions(self, row: str, decisions: list[Decision], kept_sets: tuple[Tensor, Tensor] | None = None) -> None:
        """A decision row: passes unless a decision is beyond its bound (gated only under ``tie-aware``)."""
        self.report.decisions += decisions
        check = self.report.check(row, "decision", gated=self.gates.decisions == "tie-aware")
        mismatches = [d for d in decisions if not d.is_tie]
        check.ties += len(decisions) - len(mismatches)
        detail = "; ".join(d.describe() for d in mismatches[:3])
        if kept_sets is not None and self.gates.decisions == "overlap":
            detail = f"kept-set overlap (Jaccard) min {jaccard(*kept_sets):.3f}" + (f"; {detail}" if detail else "")
        check.note(not mismatches, detail)

    def note_margin(self, label: str, ref: StageTrace, cand: StageTrace) -> None:
        """How close this stage came to a tie: the reference's smallest boundary gap against the
        candidate's bound (twice its measured score error), worst over the cases."""
        gap = boundary_gap(ref.scores, ref.kept_index.shape[1])
        bound = max(error_bound(r, c) for r, c in zip(_np(ref.scores).astype(np.float64), _np(cand.scores)))
        seen = self.report.margins.setdefault(label, {"closest_gap": gap, "bound": bound})
        seen["closest_gap"], seen["bound"] = min(seen["closest_gap"], gap), max(seen["bound"], bound)

    def replay(self, recorder: RecordingBackend, phases: set[str]) -> None:
        """Feed each candidate unit the inputs its reference twin saw and compare the outputs.

        Output names come from the manifest: the I/O contract the units were exported with. A
        prune whose decisions differ is compared with the reference re-run on its choices.
        """
        for phase, role, index, inputs, ref in recorder.calls:
            if phase not in phases:
                continue
            names = [o["name"] for o in self.manifest.graph(role, index).outputs]
            when = phase.split("[")[0]
            if role == "vision":
                ours, label, stage = self.candidate.run_vision(*inputs), "vision_encoder", 0
            elif role == "qkv":
                ours, label, stage = self.candidate.run_qkv(*inputs), f"qkv_{index} ({when})", None
            elif role == "prune":
                ours, label, stage = self.candidate.run_prune(index, *inputs), f"prune_{index}", index + 1
            else:
                ours = group_outputs(*self.candidate.run_group(index, *inputs[:6], list(inputs[6:])))
                label, stage = f"decoder_{index} ({when})", None
            ours, ref = by_name(names, ours), by_name(names, ref)
            if stage is None or len(names) == 1:  # no decisions (or the unpruned vision graph)
                self.compare_outputs(label, names, ours, ref)
                continue
            ours_trace, ref_trace = _stage_trace(ours), _stage_trace(ref)
            ours_judged, ref_judged = self.judged(stage, ours_trace), self.judged(stage, ref_trace)
            self.note_margin(label, ref_judged, ours_judged)
            decisions = judge_stage(label, ref_judged, ours_judged, self.stages[stage].contextual)
            if decisions:  # strict downstream comparison: the reference re-run on the candidate's choices
                with self.forcing({stage: ours_trace.choice}):
                    ref = by_name(names, self.reference.run_vision(*inputs) if role == "vision"
                                  else self.reference.run_prune(index, *inputs))
            self.record_decisions(f"{label}.decisions (kept, assignment)", decisions,
                                  (ours_judged.kept_index, ref_judged.kept_index))
            self.compare_outputs(label, names, ours, ref)

    def end_to_end(self, pixels: Tensor, prompts, new_tokens: int) -> None:
        """Greedy generation on both; the reference follows the candidate's (judged) prune choices."""
        ours = greedy_generate(self.candidate, pixels, prompts, new_tokens)
        cand_stages = _stages(ours)
        with self.forcing({i: s.choice for i, s in enumerate(cand_stages)}):
            ref = greedy_generate(self.reference, pixels, prompts, new_tokens)
        decisions = []
        for i, (r, o) in enumerate(zip(_stages(ref), cand_stages)):
            decisions += judge_stage(f"generate: stage {i}", self.judged(i, r), self.judged(i, o), self.stages[i].contextual)
        self.record_decisions("generate: prune decisions", decisions)
        self.compare_tokens(ours, ref, new_tokens)

    def compare_tokens(self, ours: GenerationResult, ref: GenerationResult, new_tokens: int) -> None:
        """Logits of every step while a row agrees; the first different token must be a tie."""
        gated = self.gates.end_to_end == "tie-aware"
        agreeing = torch.ones(ours.tokens.shape[0], dtype=torch.bool)
        divergence: list[Decision] = []
        first = {}
        steps = min(len(ours.step_logits), len(ref.step_logits))
        for step in range(steps):
            rows = agreeing.nonzero().flatten()
            if rows.numel() == 0:
                break
            o, r = ours.step_logits[step].cpu()[rows], ref.step_logits[step].cpu()[rows]
            result = compare_tensors({"logits": _np(o)}, {"logits": _np(r)}, self.gates, self.gates.end_to_end_relative)["logits"]
            self.report.add_tensor("generate: logits (steps before any divergence)", result, gated)
            for row in rows.tolist():
                a, b = int(ref.tokens[row, step]), int(ours.tokens[row, step]) if step < ours.tokens.shape[1] else -1
                if a != b:
                    divergence.append(judge_token(f"generate step {step}", row, ref.step_logits[step][row],
                                                  ours.step_logits[step][row], a, b))
                    agreeing[row] = False
                    first[row] = step
        self.report.decisions += divergence
        mismatches = [d for d in divergence if not d.is_tie]
        same = ours.tokens.shape == ref.tokens.shape and torch.equal(ours.tokens.cpu(), ref.tokens.cpu())
        check = self.report.check(f"generate: {new_tokens}-token greedy ids", "decision", gated=gated)
        check.ties += len(divergence) - len(mismatches)
        case = self.report.cases[-1]["label"]
        detail = f"{case}: identical" if same else "; ".join(
            [f"{case}: row {row} diverges at step {step}" for row, step in sorted(first.items())]
            + [d.describe() for d in mismatches])
        check.note(not mismatches and (same or bool(divergence)), detail)
        self.report.cases[-1]["first_divergence"] = {str(row): step for row, step in first.items()}


def _stages(result: GenerationResult) -> list[StageTrace]:
    return ([result.vision.stage] if result.vision.stage is not None else []) + list(result.stages)


def jaccard(a: Tensor, b: Tensor) -> float:
    """Worst per-sample |A ∩ B| / |A ∪ B| of two [B, k] kept sets."""
    worst = 1.0
    for x, y in zip(a.tolist(), b.tolist()):
        x, y = set(x), set(y)
        worst = min(worst, len(x & y) / len(x | y))
    return worst


def open_candidate(name: str, directory: Path, manifest: Manifest, engines: Path | None = None) -> Backend:
    """The backend under test, over the artifact folder (or its TensorRT engines)."""
    if name in ("ort", "ort-cuda"):
        from visiondrop_edge.runtime.ort_backend import OrtBackend

        return OrtBackend(directory, provider="cpu" if name == "ort" else "cuda", manifest=manifest)
    if name == "trt":
        if engines is None:
            raise UserError.naming("{candidate} trt needs {engines} (the engine folder `build` wrote)")
        from visiondrop_edge.runtime.trt_backend import TrtBackend

        return TrtBackend(engines, directory)
    raise UserError(f"unknown candidate backend '{name}': use one of {', '.join(CANDIDATES)}")


def validate_artifacts(
    directory: str | Path, images: Sequence[str | Path] = (), prompts: Sequence[str] = DEFAULT_PROMPTS,
    batch_sizes: Sequence[int] = (1, 2), new_tokens: int = 16, seed: int = 0, candidate: str | Backend = "ort",
    reference: str = "torch", engines: Path | None = None, device: str = "cpu",
    progress: Callable[[str], None] = lambda message: None,
) -> Report:
    """Validate the folder's ``candidate`` backend (a name, or a ready :class:`Backend`) against PyTorch."""
    if reference not in REFERENCES:
        raise UserError(f"unknown reference backend '{reference}': the reference is {', '.join(REFERENCES)}")
    manifest = read_manifest(directory)
    gates = gates_for(manifest.export, manifest.tolerances)
    source = manifest.model["source"]
    dtype = manifest.export["dtype"]
    # The candidate first: a missing TensorRT or GPU is reported before the reference loads.
    backend = candidate if isinstance(candidate, Backend) else open_candidate(candidate, Path(directory), manifest, engines)
    progress(f"loading the PyTorch reference ({source}, {dtype}) ...")
    loaded = apply_precision(load_model(source, dtype=EXPORT_DTYPES[dtype], device=device,
                                        conversation=backend.spec.prompt_template.name), manifest.export.get("vision_dtype"))
    if loaded.content_hash != manifest.model["content_hash"]:
        raise UserError(f"the model at {source} is not the one these artifacts were exported from (content hash differs): re-export")
    torch_reference = TorchBackend(loaded, backend.spec.schedule)
    report = Report(str(directory), source, backend.spec.schedule.describe(), gates.precision, reference,
                    f"{backend.name} ({', '.join(backend.providers)})" if hasattr(backend, "providers") else backend.name, gates.to_dict())
    template = backend.spec.prompt_template
    for label, case_images in validation_cases(backend, load_images(images), batch_sizes, seed):
        batch = len(case_images)
        case_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        progress(f"comparing {label}, batch {batch} ...")
        sizes = image_sizes(case_images, template)  # a multi-crop model: both sides on the images' grid class
        validator = Validator(torch_reference.for_images(sizes), backend.for_images(sizes), manifest, report, gates)
        spec = validator.candidate.spec
        report.cases.append({"label": label, "batch": batch, "prompts": case_prompts, "schedule": spec.schedule.describe()}
                            | ({"crop_grid": spec.schedule.grid.describe()} if spec.schedule.grid else {}))
        pixels = pixel_values(loaded.processor.image_processor, case_images, spec.prompt_template).to(device)
        prompt_batch = build_prompts(loaded.tokenizer, spec.prompt_template, case_prompts, spec.schedule.image_tokens, spec.image_token_id, spec.pad_token_id)
        recorder = RecordingBackend(validator.reference)
        greedy_generate(recorder, pixels, prompt_batch, new_tokens)
        validator.replay(recorder, {"prefill", "decode[0]"})
        validator.end_to_end(pixels, prompt_batch, new_tokens)
    return report


def validation_cases(backend: Backend, given: list, batch_sizes: Sequence[int], seed: int) -> list[tuple[str, list]]:
    """(label, images) per batch: seeded random images of every batch size, on each crop grid
    class the folder has graphs for (images filling the grid's pinpoint), then the given images,
    in batches of one grid class."""
    spec = backend.spec
    cases = []
    for plan in spec.graph_schedules():
        grid = plan.grid
        for b in batch_sizes:
            pictures = random_images(b, seed=seed + b)
            if grid is not None:
                pictures = [p.resize((grid.cols * spec.image_size, grid.rows * spec.image_size)) for p in pictures]
            cases.append((f"random{f' {grid.describe()}' if grid else ''} (seed {seed + b})", pictures))
    groups: dict = {}
    for picture, size in zip(given, image_sizes(given, spec.prompt_template)):
        groups.setdefault(backend.for_images([size]).spec.schedule, []).append(picture)
    for plan, pictures in groups.items():
        cases.append((f"given images{f' ({plan.grid.describe()})' if plan.grid else ''}", pictures))
    return cases

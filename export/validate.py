"""``validate``: prove an artifact folder computes what the PyTorch pipeline computes.

Two kinds of comparison, on fresh random images (and any the user gives):

- per unit: the PyTorch pipeline's run is recorded and every exported graph is fed the very
  inputs its PyTorch unit saw (prefill and the first decode step), so an error is pinned to
  one graph instead of snowballing: vision embeddings, kept/target indices of every stage,
  pruned sequences, q/k/v, KV caches, prefill logits;
- end to end: greedy generation on the exported graphs against PyTorch: every decode
  step's logits, and the token ids, which must be identical.

Float tensors go through Polygraphy's comparator with the manifest's tolerance, scale
relative: ``max |ours - ref| <= rel * max |ref|``. Integer outputs (indices, masks,
positions, tokens) must be equal; a kept-index mismatch reports the reference's score gap at
the k-th boundary, so a near-tie is visible as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from runtime.base import Backend, DecoderState
from runtime.generate import greedy_generate
from runtime.ort_backend import OrtBackend
from runtime.torch_backend import TorchBackend
from visiondrop.errors import UserError
from visiondrop.loading import load_model
from visiondrop.prompt import build_prompts, load_images, pixel_values, random_images

from .manifest import read_manifest
from .onnx_export import EXPORT_DTYPES

DEFAULT_PROMPTS = ("What is in this image?", "Describe the scene in one long and detailed sentence, please.")
FLOAT_GROUPS = {"query": "q/k/v", "key": "q/k/v", "value": "q/k/v",
                "pruned_query": "pruned q/k/v", "pruned_key": "pruned q/k/v", "pruned_value": "pruned q/k/v"}


@dataclass
class Check:
    """One row of the report; errors are the worst over every case that fed it."""

    name: str
    kind: str  # tensor | exact
    gated: bool = True  # False: reported only (fp16 end to end)
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max |a - b| / max |b|
    cosine: float = 1.0  # worst cosine similarity
    passed: bool = True
    detail: str = ""

    def add(self, ours: np.ndarray, ref: np.ndarray, passed: bool, detail: str = "") -> None:
        if self.kind == "tensor":
            finite = np.isfinite(ref)
            a, b = ours[finite].astype(np.float64), ref[finite].astype(np.float64)
            abs_err = float(np.abs(a - b).max()) if a.size else 0.0
            scale = float(np.abs(b).max()) if b.size else 0.0
            self.max_abs_err = max(self.max_abs_err, abs_err)
            self.max_rel_err = max(self.max_rel_err, abs_err / scale if scale else abs_err)
            norms = np.linalg.norm(a) * np.linalg.norm(b)
            self.cosine = min(self.cosine, float(a @ b / norms) if norms else 1.0)
        self.passed &= passed
        parts = [p for p in self.detail.split("; ") if p]
        parts += [p for p in detail.split("; ") if p and p not in parts]
        self.detail = "; ".join(parts)


@dataclass
class Report:
    artifacts: str
    model: str
    schedule: str
    dtype: str
    provider: str
    tolerance: dict
    cases: list[dict] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values() if c.gated)

    def check(self, name: str, kind: str = "tensor", gated: bool = True) -> Check:
        return self.checks.setdefault(name, Check(name, kind, gated))

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "checks"}
        return {**data, "passed": self.passed, "checks": [asdict(c) for c in self.checks.values()]}


class RecordingBackend(Backend):
    """Wraps a backend and records every unit call with its phase, for replay elsewhere."""

    def __init__(self, inner: Backend):
        self.inner, self.spec, self.device, self.name = inner, inner.spec, inner.device, inner.name
        self.calls: list[tuple[str, str, int, tuple, tuple]] = []  # phase, role, index, inputs, outputs
        self.phase = "prefill"
        self.decode_steps = 0

    def _record(self, role: str, index: int, inputs: tuple, outputs) -> tuple:
        self.calls.append((self.phase, role, index, inputs, tuple(outputs)))
        return outputs

    def run_vision(self, pixel_values):
        return self._record("vision", 0, (pixel_values,), self.inner.run_vision(pixel_values))

    def run_embed(self, input_ids):
        return self.inner.run_embed(input_ids)

    def run_qkv(self, group, hidden_states):
        return self._record("qkv", group, (hidden_states,), self.inner.run_qkv(group, hidden_states))

    def run_prune(self, stage, *inputs):
        return self._record("prune", stage, inputs, self.inner.run_prune(stage, *inputs))

    def run_group(self, group, *inputs):
        out, presents = self.inner.run_group(group, *inputs)
        self._record("decoder", group, inputs[:6] + tuple(inputs[6]), (out, *presents))
        return out, presents

    def decode_step(self, tokens: Tensor, state: DecoderState):
        self.phase = f"decode[{self.decode_steps}]"
        self.decode_steps += 1
        return super().decode_step(tokens, state)


def _np(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return np.ascontiguousarray((t.float() if t.is_floating_point() else t).numpy())


def _polygraphy_passed(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], rel: float) -> dict[str, bool]:
    """Polygraphy's simple comparator, with an absolute tolerance of ``rel * max |ref|`` per output."""
    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    atol = {name: rel * float(np.abs(r[np.isfinite(r)]).max(initial=0.0)) for name, r in ref.items()}
    results = RunResults([
        ("pytorch", [IterationResult(ref, runner_name="pytorch")]),
        ("exported", [IterationResult(ours, runner_name="exported")]),
    ])
    G_LOGGER.colors = False
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol={"": rel}, check_error_stat="max", infinities_compare_equal=True)
        )
    per_output = accuracy[0][("pytorch", "exported")][0]
    return {name: bool(per_output[name]) for name in ref}


def _boundary_gap(scores: np.ndarray, k: int) -> float:
    top = np.sort(scores[np.isfinite(scores)])[::-1]
    k = k - (scores.size - top.size)  # +inf (CLS) is always kept
    return float(top[k - 1] - top[k]) if 0 < k < top.size else float("inf")


def _compare_unit(report: Report, label: str, names: Sequence[str], ours: Sequence[Tensor], ref: Sequence[Tensor], rel: float) -> None:
    floats = {n: _np(r) for n, r in zip(names, ref) if r.is_floating_point()}
    exported = {n: _np(o) for n, o in zip(names, ours) if n in floats}
    for name, r in floats.items():  # equal infinities (the CLS score) agree; zero them for the statistics
        same_inf = ~np.isfinite(r) & (r == exported[name])
        r[same_inf] = exported[name][same_inf] = 0.0
    verdicts = _polygraphy_passed(exported, floats, rel) if floats else {}
    scores = dict(zip(names, ref)).get("scores")
    for name, o, r in zip(names, ours, ref):
        row = f"{label}.{name}"
        if name in floats:
            group = "KV (present.*)" if name.startswith("present.") else FLOAT_GROUPS.get(name, name)
            report.check(f"{label}.{group}").add(exported[name], floats[name], verdicts[name])
            continue
        equal = o.shape == r.shape and torch.equal(o.cpu(), r.cpu())
        detail = ""
        if not equal and name == "kept_index" and scores is not None:
            gaps = [_boundary_gap(_np(s), r.shape[1]) for s in scores]
            detail = f"score gap at the k-th boundary: {min(gaps):.3g} (a near-tie if tiny)"
        report.check(row, "exact").add(_np(o), _np(r), equal, detail)


def _replay(report: Report, recorder: RecordingBackend, exported: OrtBackend, rel: float, phases: set[str]) -> None:
    """Feed each exported graph the inputs its PyTorch twin saw and compare the outputs.

    Output names come from the manifest: the I/O contract the graphs were exported with.
    """
    for phase, role, index, inputs, ref in recorder.calls:
        if phase not in phases:
            continue
        names = [o["name"] for o in exported.manifest.graph(role, index).outputs]
        when = phase.split("[")[0]
        if role == "vision":
            ours, label = exported.run_vision(*inputs), "vision_encoder"
        elif role == "qkv":
            ours, label = exported.run_qkv(index, *inputs), f"qkv_{index} ({when})"
        elif role == "prune":
            ours, label = exported.run_prune(index, *inputs), f"prune_{index}"
        else:
            out, presents = exported.run_group(index, *inputs[:6], list(inputs[6:]))
            ours, label = (out, *presents), f"decoder_{index} ({when})"
        _compare_unit(report, label, names, ours, ref, rel)


def validate_artifacts(
    directory: str | Path, images: Sequence[str | Path] = (), prompts: Sequence[str] = DEFAULT_PROMPTS,
    batch_sizes: Sequence[int] = (1, 2), new_tokens: int = 16, seed: int = 0, provider: str = "cpu",
    device: str = "cpu", progress: Callable[[str], None] = lambda message: None,
) -> Report:
    manifest = read_manifest(directory)
    source = manifest.model["source"]
    dtype = manifest.export["dtype"]
    progress(f"loading the PyTorch reference ({source}, {dtype}) ...")
    loaded = load_model(source, dtype=EXPORT_DTYPES[dtype], device=device)
    if loaded.content_hash != manifest.model["content_hash"]:
        raise UserError(f"the model at {source} is not the one these artifacts were exported from (content hash differs): re-export")
    exported = OrtBackend(directory, provider=provider, manifest=manifest)
    reference = TorchBackend(loaded, exported.spec.schedule)
    rel = float(manifest.tolerances["relative"])
    report = Report(str(directory), source, exported.spec.schedule.describe(), dtype, exported.providers[0], manifest.tolerances)
    given = load_images(images)
    cases = [(f"random (seed {seed + b})", random_images(b, seed=seed + b)) for b in batch_sizes]
    if given:
        cases.append(("given images", given))
    for label, case_images in cases:
        batch = len(case_images)
        case_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        progress(f"comparing {label}, batch {batch} ...")
        report.cases.append({"label": label, "batch": batch, "prompts": case_prompts})
        pixels = pixel_values(loaded.processor.image_processor, case_images).to(device)
        spec = exported.spec
        prompt_batch = build_prompts(loaded.tokenizer, case_prompts, spec.schedule.image_tokens, spec.image_token_id, spec.pad_token_id)
        recorder = RecordingBackend(reference)
        ref_result = greedy_generate(recorder, pixels, prompt_batch, new_tokens)
        _replay(report, recorder, exported, rel, {"prefill", "decode[0]"})
        ours = greedy_generate(exported, pixels, prompt_batch, new_tokens)
        gated = bool(manifest.tolerances["end_to_end_gated"])
        note = "" if gated else "reported, not gated in " + dtype
        steps = min(len(ours.step_logits), len(ref_result.step_logits))
        for step in range(steps):
            o, r = _np(ours.step_logits[step]), _np(ref_result.step_logits[step])
            passed = _polygraphy_passed({"logits": o}, {"logits": r}, rel)["logits"]
            report.check(f"generate: logits step {step}", gated=gated).add(o, r, passed, note)
        same = ours.tokens.shape == ref_result.tokens.shape and torch.equal(ours.tokens.cpu(), ref_result.tokens.cpu())
        report.check(f"generate: {new_tokens}-token greedy ids", "exact", gated=gated).add(
            _np(ours.tokens), _np(ref_result.tokens), same,
            note if same else f"{note + '; ' if note else ''}ours {ours.tokens.tolist()} vs {ref_result.tokens.tolist()}",
        )
    return report

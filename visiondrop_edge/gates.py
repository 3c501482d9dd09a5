"""What ``validate`` demands of an artifact folder, per precision: the tool's own table.

The gates live here, in code, and never come from the artifact: a manifest records the gates
it was exported under (for a reader), and ``validate`` refuses a folder whose recorded gates
differ from this table, so a hand-edited manifest cannot loosen them.

Float tensors are compared after each graph is fed the inputs its PyTorch unit saw:

- ``relative``: ``max |ours - ref| <= relative * max |ref|`` per tensor (None: reported only);
- ``cosine``: cosine similarity of every float tensor at least this (TensorRT Edge-LLM gates
  its exports on 0.99);
- ``decisions``: how kept/target indices and merge assignments are judged. ``tie-aware``: a
  different choice passes only as a tie, i.e. when it is a valid choice under scores within
  the measured error of this run (see ``runtime/ties.py``), and everything downstream is then
  compared with the reference re-run on the candidate's choices. ``overlap``: quantized
  graphs legitimately change decisions, so they are reported (Jaccard overlap of kept sets,
  ties) and not gated;
- ``end_to_end``: ``tie-aware``: greedy tokens must agree until a step whose reference top-2
  logit gap is within the measured logit error (a legitimate flip), logits before that within
  ``relative`` and ``cosine``; ``report``: agreement and first divergence reported only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from visiondrop_edge.errors import UserError


@dataclass(frozen=True)
class Gates:
    precision: str
    relative: float | None
    end_to_end_relative: float | None  # the logits of every greedy step, before any divergence
    cosine: float
    decisions: str  # tie-aware | overlap
    end_to_end: str  # tie-aware | report
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EDGE_LLM_COSINE = 0.99  # TensorRT Edge-LLM's export gate, applied to every float tensor

GATES: dict[str, Gates] = {g.precision: g for g in (
    Gates("fp32", 1e-4, 1e-4, EDGE_LLM_COSINE, "tie-aware", "tie-aware",
          "fp32 kernels differ only in summation order: measured <= 6e-6 relative per graph and 3e-5 end to "
          "end on the tiny model, so 1e-4 leaves a 3x+ margin"),
    Gates("fp16", 3e-2, 1e-1, EDGE_LLM_COSINE, "tie-aware", "tie-aware",
          "one fp16 rounding is 2^-11 = 4.9e-4 relative and attention/MLP chains compound it (measured <= 1.2e-2 "
          "per graph on the tiny model), so 3e-2 per graph; end to end the rounding of every graph of prefill and "
          "of each decode step compounds (measured <= 2.2e-2 over 16 steps), so 1e-1 for the logits, with cosine "
          ">= 0.99; near-tied choices may flip and are judged by the tie rule"),
    Gates("int8", None, None, EDGE_LLM_COSINE, "overlap", "report",
          "quantized weights/activations change values by design: cosine >= 0.99 per float tensor (Edge-LLM's "
          "gate); pruning decisions and tokens are reported (overlap, first divergence), not gated"),
    Gates("fp8", None, None, EDGE_LLM_COSINE, "overlap", "report",
          "as int8: cosine >= 0.99 per float tensor; decisions and tokens reported"),
    Gates("int4-weight", None, None, EDGE_LLM_COSINE, "overlap", "report",
          "as int8: cosine >= 0.99 per float tensor; decisions and tokens reported"),
)}


def precision_of(export: dict[str, Any]) -> str:
    """An artifact folder's precision: its quantization if calibrated, else its float dtype."""
    quantization = export.get("quantization")
    return quantization["precision"] if quantization else export["dtype"]


def gates_for(export: dict[str, Any], recorded: dict[str, Any] | None = None) -> Gates:
    """The gates for a manifest's ``export`` record; refuses recorded gates that differ from the table."""
    precision = precision_of(export)
    if precision not in GATES:
        raise UserError(f"no validation gates for precision '{precision}' (known: {', '.join(GATES)}): re-export with this version")
    gates = GATES[precision]
    if recorded is not None:
        expected = gates.to_dict()
        differ = [key for key in expected if key != "why" and recorded.get(key) != expected[key]]
        if differ:
            found = ", ".join(f"{key} {recorded.get(key)!r} (this tool: {expected[key]!r})" for key in differ)
            raise UserError(f"the manifest's validation gates differ from this tool's {precision} gates: {found}; "
                            "gates are not set by an artifact: re-export with this version")
    return gates

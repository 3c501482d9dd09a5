"""What ``generate --trace`` writes: everything a user needs to debug pruning."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .loading import current_umask
from .schedule import Schedule

TOP_LOGITS = 20


def stage_records(schedule: Schedule, vision_stage, llm_stages) -> list[dict[str, Any]]:
    """Per stage: counts and, per sample, kept (dominant) and contextual target indices.

    Indices are in the stage's own input numbering: the vision stage numbers CLS 0 (where the
    tower has one) and patch p as p + 1; an LLM stage numbers the visual tokens it received, in
    order. A multi-crop image's vision stage prunes each of its ``views`` alone: view v's token t
    is ``v * (patches + CLS) + t``, and the counts are all views' (``per_view`` has one view's).
    """
    if schedule.is_full:
        return []
    views = schedule.views
    inputs = [views * schedule.vision_inputs] + schedule.stage_inputs()
    traces = [vision_stage, *llm_stages]
    records = []
    for stage, count, trace in zip(schedule.stages, inputs, traces):
        scale = views if stage.is_vision else 1
        records.append({
            "name": "vision" if stage.is_vision else f"after_layer_{stage.after_layer}",
            "after_layer": stage.after_layer,
            "input_tokens": count,
            "dominant": scale * stage.dominant,
            "contextual": scale * stage.contextual,
            **({"views": views, "per_view": {"dominant": stage.dominant, "contextual": stage.contextual}}
               if stage.is_vision and schedule.grid else {}),
            "kept_index": trace.kept_index.tolist(),
            "target_index": trace.target_index.tolist(),
        })
    return records


def top_logits(logits, count: int = TOP_LOGITS) -> list[dict[str, list]]:
    values, ids = logits.float().topk(count, dim=-1)
    return [{"ids": i.tolist(), "values": v.tolist()} for i, v in zip(ids, values)]


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file.

    The file gets the permissions a plain ``open`` would give (mkstemp's are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""``bench --artifacts-compare A,B``: two artifact folders of one model on ONNX Runtime, in one run.

Made for a quantized folder against its float source: the same requests run on both,
interleaved repeat by repeat so that machine drift (other jobs on a shared CPU) hits both
alike. Medians and best-of-N (the noise-robust figure on a shared machine) are reported, each
as a ratio baseline / candidate. Memory is measured as:

- ``peak_memory_delta_bytes``: the peak RSS above the start of one request (activations, caches);
- ``disk_bytes``: the folder's graph files, which is what the weights occupy once loaded. (The
  resident memory added by opening a folder is not reported: measured in one process after the
  other folder, it mostly shows what the allocator had already kept.)
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.errors import UserError
from visiondrop_edge.prompt import build_prompts, pixel_values, random_images

from .run import PROMPT, BenchConfig, PeakMemory, _stats, run_once

METRICS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")


def _label(directory: Path) -> str:
    quantization = read_manifest(directory, verify=False).export.get("quantization")
    return quantization["precision"] if quantization else read_manifest(directory, verify=False).export["dtype"]


def _check_pair(baseline: Path, candidate: Path) -> None:
    first, second = read_manifest(baseline), read_manifest(candidate)
    if first.model["content_hash"] != second.model["content_hash"] or first.spec != second.spec:
        raise UserError(f"{baseline} and {candidate} are not the same model and schedule: compare a folder with its own calibration")


def run_compare(baseline: Path, candidate: Path, config: BenchConfig, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Measure both folders on every batch size of ``config``; returns the JSON-ready report."""
    from transformers import AutoProcessor

    from visiondrop_edge.runtime.base import single_threaded_glue
    from visiondrop_edge.runtime.ort_backend import OrtBackend

    _check_pair(baseline, candidate)
    single_threaded_glue()
    folders = {"baseline": baseline, "candidate": candidate}
    backends = {}
    for role, folder in folders.items():
        progress(f"opening {role} {folder} ({_label(folder)}) on ONNX Runtime {config.provider} ...")
        backends[role] = OrtBackend(folder, provider=config.provider)  # applies a calibrated folder's ORT settings
    processor = AutoProcessor.from_pretrained(baseline)
    spec = backends["baseline"].spec
    rows = []
    for batch in config.batches:
        pixels = pixel_values(processor.image_processor, random_images(batch, seed=config.seed), spec.prompt_template)
        prompts = build_prompts(processor.tokenizer, spec.prompt_template, [PROMPT] * batch, spec.schedule.image_tokens,
                                spec.image_token_id, spec.pad_token_id)
        for backend in backends.values():
            for _ in range(config.warmup):
                run_once(backend, pixels, prompts, min(config.new_tokens, 2))
        peaks = {}
        for role, backend in backends.items():
            with PeakMemory(backend.device) as memory:
                run_once(backend, pixels, prompts, config.new_tokens)
            peaks[role] = memory.delta
        runs = {role: [] for role in backends}
        for repeat in range(config.repeats):  # interleaved so drift hits both alike
            for role, backend in backends.items():
                runs[role].append(run_once(backend, pixels, prompts, config.new_tokens))
            progress(f"batch {batch}: repeat {repeat + 1}/{config.repeats}")
        for role, measured in runs.items():
            rows.append({
                "batch": batch, "variant": role, "folder": str(folders[role]), "precision": _label(folders[role]),
                "vision_ms": _stats([r["vision"] for r in measured]),
                "prefill_ms": _stats([r["prefill"] for r in measured]),
                "ttft_ms": _stats([r["ttft"] for r in measured]),
                "decode_ms_per_token": _stats([statistics.median(r["decode"]) for r in measured]),
                "peak_memory_delta_bytes": peaks[role],
                "disk_bytes": _disk_bytes(folders[role]),
            })
    return {"config": asdict(config), "baseline": str(baseline), "candidate": str(candidate),
            "results": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per batch: baseline / candidate for each time (median and best-of-N) and each memory figure."""
    index = {(r["batch"], r["variant"]): r for r in rows}
    summary = []
    for batch in sorted({r["batch"] for r in rows}):
        base, cand = index[(batch, "baseline")], index[(batch, "candidate")]
        entry = {"batch": batch}
        for metric in METRICS:
            name = metric.rsplit("_ms", 1)[0]
            entry[f"{name}_speedup"] = base[metric]["median"] / cand[metric]["median"]
            entry[f"{name}_speedup_best"] = base[metric]["min"] / cand[metric]["min"]
        for memory in ("peak_memory_delta_bytes", "disk_bytes"):
            entry[f"{memory.removesuffix('_bytes')}_ratio"] = cand[memory] / base[memory] if base[memory] else float("nan")
        summary.append(entry)
    return summary


def _disk_bytes(directory: Path) -> int:
    manifest = read_manifest(directory, verify=False)
    return sum((directory / name).stat().st_size for entry in manifest.graphs for name in (entry.file, entry.external_data) if name)

"""``bench``: speed and memory per budget, pruned against ideal against full, in one run.

For every budget and batch size the pipeline runs three ways, interleaved repeat by repeat
so that machine drift hits all alike: ``pruned`` (VisionDrop), ``ideal`` (the same model
fed sequences of exactly each stage's size, no scoring or merging: see
``bench/ideal.py``) and ``full`` (no pruning, the baseline). Reported:
median/min/max of vision encode, prefill and TTFT, decode time per token and tokens/s,
peak memory (process RSS on CPU, max allocated on CUDA), KV-cache bytes and analytic FLOPs
per stage; then speed-ups against full and the pruning overhead ``pruned / ideal - 1``.
Nothing here is a pass/fail test: the numbers are for the user (and issue notes).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from visiondrop_edge.runtime.base import Backend, DelegatingBackend, single_threaded_glue
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.loading import LoadedModel
from visiondrop_edge.prompt import build_prompts, image_sizes, pixel_values, random_images
from visiondrop_edge.pruning import REFERENCE_OPS
from visiondrop_edge.schedule import REFERENCE_GRID, Schedule

from .clock import SpanClock
from .flops import stage_flops
from .ideal import IdealBaseline, IdealVision

PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class BenchConfig:
    budgets: tuple[str, ...] = ()  # () = the model family's paper budgets; full is always added
    batches: tuple[int, ...] = (1, 4)
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 5
    backend: str = "torch"  # torch | ort | trt
    provider: str = "cpu"
    seed: int = 0
    cpu_load: int = 0  # busy worker processes running during the measurements (a contended Jetson CPU)
    contexts: tuple[int, ...] = ()  # decode ms/token on caches of these many (unpruned) tokens
    scope: str = "block"  # a multi-crop model's LLM-stage scope (schedule.SCOPES)
    cuda_graph: bool = False  # torch backend: decode steps, vision encodes and prefills as CUDA graph replays (runtime/static_*.py)


class PeakMemory:
    """Peak memory over a block: CUDA max-allocated, or process RSS sampled every 2 ms.

    ``delta`` is the peak above the level at the start: what the request itself added
    (activations, caches), separable from weights and from earlier configurations.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.start = 0
        self._stop = threading.Event()

    @property
    def delta(self) -> int:
        return self.peak - self.start

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.peak = self.start = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def _spin(stop) -> None:
    while not stop.is_set():
        pass


@contextmanager
def cpu_load(workers: int) -> Iterator[None]:
    """``workers`` processes that keep a core busy each while the block runs, then stop."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    processes = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        yield
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=10)  # a worker still starting up (spawn re-imports) may not have seen stop yet
            if process.is_alive():
                process.kill()
                process.join()


def decode_bytes(loaded: LoadedModel) -> int:
    """Bytes of the weights every decode step reads once: the decoder layers, the final norm
    and the LM head (of the embedding table only one row per token)."""
    text = loaded.family.decoder(loaded.model)
    tensors = [*text.layers.parameters(), *text.norm.parameters(), *text.lm_head.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class PruneClock(DelegatingBackend):
    """``inner`` (bound to its images), with the time its LLM prune units take in a prefill
    summed by :attr:`clock`. Measured inside the request, this cost is not blurred by the
    drift between requests that ``pruned / ideal - 1`` suffers."""

    def __init__(self, inner: Backend):
        super().__init__(inner)
        self.clock = SpanClock(inner.device)
        self.replays = None  # its marks are host-side calls: a recorded prefill would replay none of them

    def run_prune(self, stage, *inputs):
        with self.clock.span():
            return self.inner.run_prune(stage, *inputs)

    def encode_image(self, pixel_values):
        return self.inner.encode_image(pixel_values)

    def extend(self, input_ids, attention_mask, state):
        return self.inner.extend(input_ids, attention_mask, state)

    def decode_step(self, tokens, state):  # the inner backend's own step (a CUDA graph replay, if it records one)
        return self.inner.decode_step(tokens, state)


def run_once(backend: Backend, pixels, prompts, new_tokens: int) -> dict[str, float | list[float]]:
    """One timed request: vision, prefill, then ``new_tokens`` greedy decode steps."""
    device = backend.device
    clock = getattr(backend, "clock", None)  # the pruned pipeline's prune units, or the ideal's splices
    if clock is not None:
        clock.spent()  # forget spans outside this request's prefill
    _sync(device)
    start = time.perf_counter()
    vision = backend.encode_image(pixels)
    _sync(device)
    after_vision = time.perf_counter()
    prefill = backend.prefill(prompts.input_ids, vision.image_embeds, prompts.attention_mask, prompts.image_offset)
    _sync(device)
    after_prefill = time.perf_counter()
    clocked = clock.spent() if clock is not None else None
    logits, state, steps = prefill.logits, prefill.state, []
    for _ in range(new_tokens):
        tick = time.perf_counter()
        logits, state = backend.decode_step(logits.argmax(-1), state)
        _sync(device)
        steps.append(time.perf_counter() - tick)
    # the filled slots (a cache buffer also holds up to a block of room for the next tokens)
    kv_bytes = sum(t[:, :, :mask.shape[1]].numel() * t.element_size() for cache, mask in zip(state.caches, state.masks) for t in cache)
    return {
        "vision": (after_vision - start) * 1e3, "prefill": (after_prefill - after_vision) * 1e3,
        "ttft": (after_prefill - start) * 1e3, "decode": [s * 1e3 for s in steps], "kv_bytes": kv_bytes, "clocked": clocked,
    }


def context_state(backend: Backend, pixels, prompts, context: int, image_tokens: int):
    """The first logits and caches after the prompt and then filler text up to ``context`` tokens
    of conversation, counted unpruned (the image as ``image_tokens``, the full schedule's count;
    a pruned group holds fewer): the same conversation's decode cost for every budget."""
    vision = backend.encode_image(pixels)
    prefill = backend.prefill(prompts.input_ids, vision.image_embeds, prompts.attention_mask, prompts.image_offset)
    filler = context - (prompts.input_ids.shape[1] - backend.spec.schedule.image_tokens + image_tokens)
    if filler <= 0:
        return prefill.logits, prefill.state
    text = prompts.input_ids[:, -8:]  # the prompt's last tokens, repeated
    ids = text.repeat(1, -(-filler // text.shape[1]))[:, :filler]
    return backend.extend(ids, torch.ones_like(ids), prefill.state)


def time_decode(backend: Backend, logits, state, steps: int) -> float:
    """Median ms per greedy step over ``steps`` steps from ``state`` (which is left as it was)."""
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        logits, state = backend.decode_step(logits.argmax(-1), state)
        _sync(backend.device)
        times.append(time.perf_counter() - tick)
    return statistics.median(times) * 1e3


def context_rows(backends: dict[str, Backend], pixels, prompts: dict, config: BenchConfig, budget: str, batch: int,
                 image_tokens: int) -> list[dict]:
    """Decode ms/token against cache length, the variants interleaved repeat by repeat. A state
    is decoded from again in every repeat: its first step copies the cache into new buffers
    (it is no longer the newest state on them), so the median over steps is reported."""
    rows = []
    for context in config.contexts:
        starts = {v: context_state(b, pixels, prompts[v], context, image_tokens) for v, b in backends.items()}
        runs = {v: [] for v in backends}
        for _ in range(config.repeats):
            for v, b in backends.items():
                runs[v].append(time_decode(b, *starts[v], max(config.new_tokens, 3)))
        for v, (_, state) in starts.items():
            rows.append({"budget": budget, "batch": batch, "variant": v, "context": context,
                         "cache_tokens": [m.shape[1] for m in state.masks], "decode_ms_per_token": _stats(runs[v])})
        del starts
    return rows


def context_slopes(rows: list[dict]) -> list[dict]:
    """Per (budget, batch, variant): the least-squares growth of best decode ms/token per 1000
    tokens of context (the cost a longer cache adds to every step)."""
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["budget"], r["batch"], r["variant"]), []).append((r["context"], r["decode_ms_per_token"]["min"]))
    out = []
    for (budget, batch, variant), points in series.items():
        if len(points) < 2:
            continue
        mean_x = statistics.fmean(x for x, _ in points)
        mean_y = statistics.fmean(y for _, y in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        out.append({"budget": budget, "batch": batch, "variant": variant, "ms_per_1000_tokens": slope * 1e3})
    return out


def _ort_backend(loaded: LoadedModel, schedule: Schedule, scratch: Path, config: BenchConfig) -> Backend:
    """Export this budget to ``scratch`` and open it on ONNX Runtime, with room for the bench's
    longest conversation (the prompt, the decoded tokens, the --contexts filler; unpruned
    LLaVA-NeXT holds 2928 image tokens)."""
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
    from visiondrop_edge.loading import EXPORT_DTYPES
    from visiondrop_edge.runtime.ort_backend import OrtBackend

    longest = max([schedule.image_tokens + 64, *config.contexts]) + max(config.new_tokens, 3) + 1
    options = ExportOptions(dtype={v: k for k, v in EXPORT_DTYPES.items()}[next(loaded.model.parameters()).dtype],
                            max_seq_len=max(ExportOptions.max_seq_len, -(-longest // 256) * 256))
    folder = scratch / f"budget-{schedule.describe().replace(',', '_').replace(':', '-')}"
    export_artifacts(loaded, schedule, folder, options)
    return OrtBackend(folder, provider=config.provider)


def _ort_ideal_vision(loaded: LoadedModel, backend, scratch: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ideal vision unit (one view's) exported like the others and run on the backend's providers."""
    import onnxruntime

    from visiondrop_edge.export.onnx_export import ExportOptions, GraphSpec, export_graph
    from visiondrop_edge.contract import VISION_INPUTS, dynamic_axes, vision_outputs
    from visiondrop_edge.loading import EXPORT_DTYPES
    from visiondrop_edge.runtime.ort_backend import session_options

    dtype = backend.spec.vision_torch_dtype
    size = backend.spec.image_size
    module = IdealVision(loaded.family.vision_unit(loaded.model, backend.spec.schedule.vision, REFERENCE_OPS)).eval()
    outputs = vision_outputs(prunes=False)
    graph = GraphSpec("vision_ideal", "vision", 0, module, {"pixel_values": torch.randn(2, 3, size, size, dtype=dtype)},
                      list(outputs), dynamic_axes("vision", VISION_INPUTS + outputs))
    folder = Path(tempfile.mkdtemp(prefix="ideal-", dir=scratch))
    entry = export_graph(graph, folder, Path(tempfile.mkdtemp(dir=scratch)), ExportOptions(dtype={v: k for k, v in EXPORT_DTYPES.items()}[backend.spec.torch_dtype]), {})
    session = onnxruntime.InferenceSession(str(folder / entry.file), session_options("vision"), providers=backend.providers)
    return lambda pixels: torch.from_numpy(session.run(None, {"pixel_values": pixels.to(dtype).numpy()})[0])


def pipeline_backend(loaded: LoadedModel, schedule: Schedule, scratch: Path, config: BenchConfig) -> Backend:
    """The pipeline on ``config.backend``: PyTorch, or this budget exported to ``scratch`` on ONNX Runtime."""
    if config.backend == "ort":
        return _ort_backend(loaded, schedule, scratch, config)
    return TorchBackend(loaded, schedule, cuda_graph=config.cuda_graph)


def _variants(loaded: LoadedModel, schedule: Schedule, scratch: Path, config: BenchConfig, baseline: Backend) -> dict[str, Backend]:
    """The pruned pipeline, its ideal baseline over the same units, and the unpruned ``baseline``
    (measured in the same interleaved loop, so that every speed-up is a ratio of one window);
    for the full schedule the baseline alone."""
    if schedule.is_full:
        return {"full": baseline}
    backend = pipeline_backend(loaded, schedule, scratch, config)
    if config.backend == "ort":
        vision = _ort_ideal_vision(loaded, backend, scratch)
    else:
        vision = torch.inference_mode()(IdealVision(loaded.family.vision_unit(loaded.model, schedule.vision, REFERENCE_OPS)).eval())
    return {"pruned": backend, "ideal": IdealBaseline(backend, vision), "full": baseline}


def bench_images(spec, batch: int, seed: int) -> list:
    """Seeded random images; for a multi-crop model images filling the grid the budget is defined on (2x2)."""
    size = spec.image_size * (REFERENCE_GRID.rows if spec.schedule.grid is not None else 1)
    return random_images(batch, seed=seed, size=size)


def run_bench(loaded: LoadedModel, config: BenchConfig, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Measure every (budget, batch); returns the JSON-ready report.

    The unpruned model is exported once and measured again beside every budget: a 2-core
    machine drifts by tens of percent over a run, so a baseline measured minutes apart from a
    budget decides nothing about a few percent of decode speed-up.
    """
    budgets = list(dict.fromkeys(config.budgets or loaded.family.paper_budgets))
    schedules = {b: loaded.schedule(b, scope=config.scope) for b in [*budgets, "full"]}
    measured_budgets = [b for b in budgets if not schedules[b].is_full] or ["full"]
    total = sum(len(config.batches) * (1 if schedules[b].is_full else 3) for b in measured_budgets)
    rows, contexts, done = [], [], 0
    if config.backend != "torch":
        single_threaded_glue()  # as `generate --artifacts` runs them
    with tempfile.TemporaryDirectory(prefix="visiondrop-bench-") as scratch, cpu_load(config.cpu_load):
        if config.backend == "ort":
            progress("exporting budget full (the baseline) for ONNX Runtime ...")
        baseline = pipeline_backend(loaded, schedules["full"], Path(scratch), config)
        for budget in measured_budgets:
            if config.backend == "ort" and budget != "full":
                progress(f"exporting budget {budget} for ONNX Runtime ...")
            unbound = _variants(loaded, schedules[budget], Path(scratch), config, baseline)
            for batch in config.batches:
                images = bench_images(baseline.spec, batch, config.seed)
                backends = {v: b.for_images(image_sizes(images, b.spec.prompt_template)) for v, b in unbound.items()}
                if "pruned" in backends and not config.cuda_graph:  # a replayed prefill has no unit calls to time
                    backends["pruned"] = PruneClock(backends["pruned"])
                    backends["ideal"].clock = SpanClock(baseline.device)
                template = baseline.spec.prompt_template
                pixels = pixel_values(loaded.processor.image_processor, images, template)
                # the images' grid's schedules (for a multi-crop model the budget's, 2x2, as they fill it)
                plans = {v: b.spec.schedule for v, b in backends.items()}
                prompts = {v: build_prompts(loaded.tokenizer, template, [PROMPT] * batch, plans[v].image_tokens,
                                            baseline.spec.image_token_id, baseline.spec.pad_token_id) for v in backends}
                text_tokens = prompts["full"].input_ids.shape[1] - plans["full"].image_tokens
                variants = list(backends)
                runs = {v: [] for v in variants}
                peaks = {}
                for v in variants:  # warm-up
                    for _ in range(config.warmup):
                        run_once(backends[v], pixels, prompts[v], min(config.new_tokens, 2))
                for v in variants:
                    with PeakMemory(baseline.device) as memory:
                        run_once(backends[v], pixels, prompts[v], config.new_tokens)
                    peaks[v] = (memory.peak, memory.delta)
                for _ in range(config.repeats):  # interleaved so drift hits every variant alike
                    for v in variants:
                        runs[v].append(run_once(backends[v], pixels, prompts[v], config.new_tokens))
                for v in variants:
                    done += 1
                    measured, schedule = runs[v], plans[v]
                    decode = [statistics.median(r["decode"]) for r in measured] if config.new_tokens else [float("nan")]
                    row = {
                        "budget": budget, "batch": batch, "variant": v, "schedule": schedule.describe(),
                        "average_tokens_per_layer": schedule.average_tokens(), "text_tokens": text_tokens,
                        "image_tokens": schedule.image_tokens, "crop_grid": schedule.grid.describe() if schedule.grid else None,
                        "vision_ms": _stats([r["vision"] for r in measured]),
                        "prefill_ms": _stats([r["prefill"] for r in measured]),
                        "ttft_ms": _stats([r["ttft"] for r in measured]),
                        "decode_ms_per_token": _stats(decode),
                        "tokens_per_s": batch * 1e3 / statistics.median(decode),
                        "peak_memory_bytes": peaks[v][0],
                        "peak_memory_delta_bytes": peaks[v][1],
                        "kv_cache_bytes": measured[0]["kv_bytes"],
                        "flops": stage_flops(loaded.config, schedule, text_tokens, batch, ideal=v == "ideal"),
                    }
                    if measured[0]["clocked"] is not None:  # the clocked spans' time inside each prefill, and over the rest of it
                        spent, share = ("prune_ms", "prune_units_overhead") if v == "pruned" else ("splices_ms", "splices_overhead")
                        row[spent] = _stats([r["clocked"] for r in measured])
                        row[share] = _stats([r["clocked"] / (r["prefill"] - r["clocked"]) for r in measured])
                    rows.append(row)
                    progress(f"[{done}/{total}] budget {budget} batch {batch} {v}: prefill {row['prefill_ms']['median']:.1f} ms, "
                             f"TTFT {row['ttft_ms']['median']:.1f} ms, decode {row['decode_ms_per_token']['median']:.2f} ms/token")
                if config.contexts:
                    progress(f"budget {budget} batch {batch}: decode at {', '.join(map(str, config.contexts))} tokens of context ...")
                    decoded = {v: b for v, b in backends.items() if v != "ideal"}  # pruned and full
                    contexts += context_rows(decoded, pixels, prompts, config, budget, batch, schedules["full"].image_tokens)
    report = {"config": asdict(config), "machine": _machine(loaded), "results": rows, "summary": summarize(rows, decode_bytes(loaded))}
    if contexts:
        report["context"] = {"results": contexts, "slopes": context_slopes(contexts)}
    return report


def run_engines(engine_dirs: list[Path], config: BenchConfig, progress: Callable[[str], None] = lambda m: None) -> dict:
    """TensorRT engine folders, each with the schedule it was exported with: the pipeline as
    built (no ideal variant: engines hold no ideal vision graph), per batch size. A folder
    built from ``--budget full`` artifacts is the baseline of the speed-ups."""
    from transformers import AutoProcessor

    from visiondrop_edge.runtime.trt_backend import TrtBackend

    rows = []
    for folder in engine_dirs:
        progress(f"loading engines {folder} ...")
        backend = TrtBackend(folder)
        processor = AutoProcessor.from_pretrained(backend.artifacts)
        schedule = backend.spec.schedule
        for batch in config.batches:
            images = bench_images(backend.spec, batch, config.seed)
            backend = backend.for_images(image_sizes(images, backend.spec.prompt_template))
            schedule = backend.spec.schedule
            pixels = pixel_values(processor.image_processor, images, backend.spec.prompt_template)
            prompts = build_prompts(processor.tokenizer, backend.spec.prompt_template, [PROMPT] * batch, schedule.image_tokens,
                                    backend.spec.image_token_id, backend.spec.pad_token_id)
            for _ in range(config.warmup):
                run_once(backend, pixels, prompts, min(config.new_tokens, 2))
            with PeakMemory(backend.device) as memory:
                run_once(backend, pixels, prompts, config.new_tokens)
            measured = [run_once(backend, pixels, prompts, config.new_tokens) for _ in range(config.repeats)]
            decode = [statistics.median(r["decode"]) for r in measured] if config.new_tokens else [float("nan")]
            row = {"engines": str(folder), "budget": schedule.describe(), "full": schedule.is_full, "batch": batch,
                   "average_tokens_per_layer": schedule.average_tokens(),
                   "vision_ms": _stats([r["vision"] for r in measured]),
                   "prefill_ms": _stats([r["prefill"] for r in measured]),
                   "ttft_ms": _stats([r["ttft"] for r in measured]), "decode_ms_per_token": _stats(decode),
                   "tokens_per_s": batch * 1e3 / statistics.median(decode), "peak_memory_bytes": memory.peak,
                   "peak_memory_delta_bytes": memory.delta, "kv_cache_bytes": measured[0]["kv_bytes"]}
            rows.append(row)
            progress(f"{folder} batch {batch}: prefill {row['prefill_ms']['median']:.2f} ms, "
                     f"decode {row['decode_ms_per_token']['median']:.2f} ms/token")
        del backend
        torch.cuda.empty_cache()
    baselines = {r["batch"]: r for r in rows if r["full"]}
    for row in rows:
        full = baselines.get(row["batch"])
        if full is not None and not row["full"]:
            row["prefill_speedup"] = full["prefill_ms"]["median"] / row["prefill_ms"]["median"]
            row["decode_speedup"] = full["decode_ms_per_token"]["median"] / row["decode_ms_per_token"]["median"]
    return {"config": asdict(config), "results": rows}


def summarize(rows: list[dict], weight_bytes: int) -> list[dict]:
    """Speed-ups against full and the pruning overhead, per (budget, batch).

    ``decode_speedup_predicted`` is what the bytes alone allow: a memory-bound decode step
    reads every weight (``weight_bytes``) and the whole KV cache once, so the speed-up is
    (weights + full cache) / (weights + pruned cache), with each cache as it is after the run.
    """
    index = {(r["budget"], r["batch"], r["variant"]): r for r in rows}
    summary = []
    for (budget, batch, variant), row in index.items():
        if variant != "pruned":
            continue
        full, ideal = index[(budget, batch, "full")], index[(budget, batch, "ideal")]
        med = lambda r, key: r[key]["median"]  # noqa: E731
        clocked = "prune_units_overhead" in row
        summary.append({
            "budget": budget, "batch": batch,
            "prefill_speedup": med(full, "prefill_ms") / med(row, "prefill_ms"),
            "ideal_prefill_speedup": med(full, "prefill_ms") / med(ideal, "prefill_ms"),
            "fraction_of_ideal_speedup": med(ideal, "prefill_ms") / med(row, "prefill_ms"),
            "pruning_overhead": med(row, "prefill_ms") / med(ideal, "prefill_ms") - 1,
            # best-of-N: the noise-robust estimate of fixed work on a shared machine
            "pruning_overhead_best": row["prefill_ms"]["min"] / ideal["prefill_ms"]["min"] - 1,
            # the same cost measured inside each request, so free of that drift: the LLM prune units'
            # time over the rest of the prefill
            # (None where nothing timed the units: a replayed prefill has no unit calls)
            "prune_units_overhead": med(row, "prune_units_overhead") if clocked else None,
            "prune_units_overhead_best": row["prune_units_overhead"]["min"] if clocked else None,
            # less the ideal's own splices (the sequence moves that stand in for the prunes there), each
            # over the rest of its prefill: the pruning's net cost, within requests
            "net_prune_overhead": med(row, "prune_units_overhead") - med(ideal, "splices_overhead") if clocked else None,
            "net_prune_overhead_best": row["prune_units_overhead"]["min"] - ideal["splices_overhead"]["min"] if clocked else None,
            "ttft_speedup": med(full, "ttft_ms") / med(row, "ttft_ms"),
            "ttft_overhead": med(row, "ttft_ms") / med(ideal, "ttft_ms") - 1,
            "decode_speedup": med(full, "decode_ms_per_token") / med(row, "decode_ms_per_token"),
            "decode_speedup_best": full["decode_ms_per_token"]["min"] / row["decode_ms_per_token"]["min"],
            "decode_speedup_predicted": (weight_bytes + full["kv_cache_bytes"]) / (weight_bytes + row["kv_cache_bytes"]),
            "flops_fraction": row["flops"]["prefill_total"] / full["flops"]["prefill_total"],
        })
    return summary


def _machine(loaded: LoadedModel) -> dict:
    device = next(loaded.model.parameters()).device
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

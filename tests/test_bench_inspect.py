"""bench (structure and exact accounting, never timings) and inspect (panels follow the schedule)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
import torch
from PIL import Image

from visiondrop_edge import cli
from visiondrop_edge.bench.flops import stage_flops
from visiondrop_edge.bench.ideal import IdealBaseline, IdealVision
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.inspection import CLS, inspect_image
from visiondrop_edge.prompt import build_prompts, pad_token_id, pixel_values, random_images
from visiondrop_edge.schedule import Schedule


def test_ideal_prefill_gives_every_group_the_pruned_sizes(tiny):
    schedule = Schedule.from_budget(64, 8, 576)
    backend = TorchBackend(tiny, schedule)
    pixels = pixel_values(tiny.processor.image_processor, random_images(2, seed=4))
    batch = build_prompts(tiny.tokenizer, tiny.template, ["a", "a longer prompt"], schedule.image_tokens, tiny.config.image_token_id, pad_token_id(tiny.tokenizer))
    ideal = IdealBaseline(backend, IdealVision(backend.pipeline.vision).eval())
    shapes = {}
    for variant in (backend, ideal):
        with torch.inference_mode():
            vision = variant.encode_image(pixels)
            assert vision.image_embeds.shape == (2, schedule.image_tokens, 64)
            state = variant.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset).state
        shapes[variant is ideal] = [[tuple(t.shape) for t in cache] for cache in state.caches]
        assert [m.sum(-1).tolist() for m in state.masks] == [
            (batch.attention_mask.sum(-1) - schedule.image_tokens + count).tolist()
            for count in [schedule.image_tokens] + [s.total for s in schedule.llm_stages]
        ]
    assert shapes[False] == shapes[True]


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_bench_reports_every_budget_against_full(tmp_path, backend):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    torch.set_num_threads(2)
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny", "--backend", backend, "--budgets", "32,128",
                                          "--batch", "1,2", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0",
                                          "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    # the ONNX Runtime pipeline's host glue runs on one torch thread, as `generate --artifacts` runs it
    assert torch.get_num_threads() == (1 if backend == "ort" else 2)
    report = json.loads(out.read_text())
    assert Image.open(plot).size[0] > 800
    variants = {(r["budget"], r["batch"], r["variant"]) for r in report["results"]}
    # the unpruned baseline is measured beside every budget (one interleaved loop per budget)
    assert variants == {(b, n, v) for b in ("32", "128") for n in (1, 2) for v in ("pruned", "ideal", "full")}
    assert {(s["budget"], s["batch"]) for s in report["summary"]} == {(b, n) for b in ("32", "128") for n in (1, 2)}
    assert all(s["prune_units_overhead"] >= s["prune_units_overhead_best"] > 0 for s in report["summary"])
    rows = {(r["budget"], r["batch"], r["variant"]): r for r in report["results"]}
    for s in report["summary"]:  # the net cost: each share over the rest of its own prefill, the ideal's splices subtracted
        pruned, ideal = rows[(s["budget"], s["batch"], "pruned")], rows[(s["budget"], s["batch"], "ideal")]
        assert s["net_prune_overhead"] == pytest.approx(
            pruned["prune_units_overhead"]["median"] - ideal["splices_overhead"]["median"], rel=1e-12)
        assert s["net_prune_overhead_best"] == pytest.approx(
            pruned["prune_units_overhead"]["min"] - ideal["splices_overhead"]["min"], rel=1e-12)
    for row in report["results"]:
        schedule = Schedule.from_budget("full" if row["variant"] == "full" else row["budget"], 8, 576)
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"):
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"] and row[key]["min"] > 0
        assert row["peak_memory_bytes"] > 0 and 0 <= row["peak_memory_delta_bytes"] <= row["peak_memory_bytes"]
        # KV bytes, counted independently: per layer K and V of batch x 2 heads x length x 16 dims x 4 bytes,
        # where a group's length is the prompt's text, its visual tokens and the 3 generated tokens.
        visual = [schedule.image_tokens] + [s.total for s in schedule.llm_stages]
        expected = sum(2 * row["batch"] * 2 * (row["text_tokens"] + visual[g] + 3) * 16 * 4 * (stop - start)
                       for g, (start, stop) in enumerate(schedule.layer_groups()))
        assert row["kv_cache_bytes"] == expected
        if row["variant"] != "full":  # the prune units (the ideal: its splices) are timed inside each prefill, and are part of it
            spent = row["prune_ms" if row["variant"] == "pruned" else "splices_ms"]
            assert 0 < spent["min"] and spent["max"] < row["prefill_ms"]["max"]
    flops = {(r["budget"], r["batch"], r["variant"]): r["flops"]["prefill_total"] for r in report["results"]}
    assert flops[("32", 1, "ideal")] < flops[("32", 1, "pruned")] < flops[("128", 1, "pruned")] < flops[("32", 1, "full")]
    assert flops[("32", 1, "full")] == flops[("128", 1, "full")]
    assert flops[("32", 2, "pruned")] == pytest.approx(2 * flops[("32", 1, "pruned")])


def test_bench_under_cpu_load_predicts_decode_from_bytes(tmp_path, tiny):
    """--cpu-load runs its workers only during the measurements; the predicted decode speed-up
    is (weights + full cache) / (weights + pruned cache), weights counted from the config."""
    import multiprocessing

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny", "--budgets", "64", "--batch", "1", "--max-new-tokens", "2",
                                          "--repeats", "1", "--warmup", "0", "--cpu-load", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert not multiprocessing.active_children()
    report = json.loads(out.read_text())
    assert report["config"]["cpu_load"] == 1
    text = tiny.config.text_config
    d, inter = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * d // text.num_attention_heads  # k and v widths (GQA)
    # per layer: q, o (d x d), k, v (d x kv), gate/up/down (d x inter), two norms; the final norm; the LM head; fp32
    weights = 4 * (text.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d) + d + d * text.vocab_size)
    rows = {r["variant"]: r for r in report["results"]}
    [summary] = report["summary"]
    assert summary["decode_speedup_predicted"] == pytest.approx(
        (weights + rows["full"]["kv_cache_bytes"]) / (weights + rows["pruned"]["kv_cache_bytes"]), rel=1e-12)


def test_bench_contexts_decode_on_caches_of_the_asked_lengths(tmp_path):
    """--contexts: every group's cache holds the asked conversation (counted unpruned) less the
    visual tokens dropped before it."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny", "--budgets", "64", "--batch", "1", "--max-new-tokens", "2",
                                          "--repeats", "1", "--warmup", "0", "--contexts", "700,760", "--json", str(out)])
    assert result.exit_code == 0, result.output
    context = json.loads(out.read_text())["context"]
    rows = {(r["budget"], r["variant"], r["context"]): r for r in context["results"]}
    assert set(rows) == {("64", v, c) for v in ("pruned", "full") for c in (700, 760)}
    for (budget, variant, length), row in rows.items():
        schedule = Schedule.from_budget("full" if variant == "full" else budget, 8, 576)
        visual = [schedule.image_tokens] + [s.total for s in schedule.llm_stages]
        assert row["cache_tokens"] == [length - 576 + count for count in visual]
        assert 0 < row["decode_ms_per_token"]["min"] <= row["decode_ms_per_token"]["median"]
    assert {(s["budget"], s["variant"]) for s in context["slopes"]} == {("64", "pruned"), ("64", "full")}


def test_flops_scale_with_sequence_length(tiny):
    full = stage_flops(tiny.config, Schedule.from_budget("full", 8, 576), text_tokens=20, batch=1)
    pruned = stage_flops(tiny.config, Schedule.from_budget(64, 8, 576), text_tokens=20, batch=1)
    assert set(pruned) >= {"vision", "prune_0", "prune_1", "prune_2", "decoder_0", "decoder_3", "lm_head", "decode_step"}
    assert pruned["decoder_3"] < full["decoder_0"] / 4  # 2 layers of 58 tokens against 2 of 596
    assert pruned["decode_step"] < full["decode_step"]


@pytest.mark.parametrize("budget", [32, 128])
def test_inspect_panels_follow_the_schedule(tiny, budget):
    schedule = Schedule.from_budget(budget, 8, 576)
    image = Image.open("examples/cat.png").convert("RGB")
    panels, [canvas] = inspect_image(tiny, schedule, image, "What is this?")
    assert canvas.image.shape == (336, 336, 3) and (canvas.first_patch, canvas.columns) == (0, 24)
    assert len(panels) == len(schedule.stages)
    for panel, stage in zip(panels, schedule.stages):
        assert len(panel.dominant) == stage.dominant and len(panel.contextual) == stage.contextual
        covered = [p for c in panel.dominant_coverage for p in c] + [p for g in panel.contextual for p in g["patches"]]
        assert sorted(covered) == list(range(576))  # every patch is in exactly one token at every stage
        representatives = [p for p in panel.dominant if p != CLS] + [g["target"] for g in panel.contextual if g["target"] != CLS]
        assert len(set(representatives)) == len(representatives)
    backend = TorchBackend(tiny, schedule)
    vision = backend.encode_image(pixel_values(tiny.processor.image_processor, [image]))
    assert panels[0].dominant == [CLS] + [i - 1 for i in vision.stage.kept_index[0].tolist()[1:]]


def test_inspect_cli_draws_one_panel_per_stage(tmp_path):
    out = tmp_path / "kept.png"
    result = CliRunner().invoke(cli.cli, ["inspect", "--image", "examples/cat.png", "--budget", "64", "--out", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    schedule = Schedule.from_budget(64, 8, 576)
    assert [(len(s["dominant"]), len(s["contextual"])) for s in data["stages"]] == [(s.dominant, s.contextual) for s in schedule.stages]
    picture = np.asarray(Image.open(out))
    assert picture.shape[1] > 3 * picture.shape[0]  # four panels side by side
    bad = CliRunner().invoke(cli.cli, ["inspect", "--image", "examples/cat.png", "--budget", "full", "--out", str(out)])
    assert bad.exit_code == 2 and "nothing to inspect" in bad.stderr

"""LLaVA-NeXT (multi-crop "anyres" images): the budget rule, the built-in ``tiny-next``, the
family's crop grids against HF's processor, ``budget=full`` against HF ``generate`` and the
batched pipeline against the naive per-sample reference, for every grid class.

Tolerances are test_pipeline's and for the same reason (fp32 on CPU, different kernels on the
two sides: rounding only, ~10x the 1e-5 relative noise floor of the tiny model); kept indices,
targets and generated tokens must be identical.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from tests.reference import naive_generate
from visiondrop_edge.export.graph_checks import data_dependent_shapes
from visiondrop_edge.export.trt_build import BuildOptions, plan_build
from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
from visiondrop_edge.errors import CheckpointError, InputError, UserError
from visiondrop_edge.families import family_for_config
from visiondrop_edge.families.llava_next import LlavaNext
from visiondrop_edge.loading import builtin_dir, load_model
from visiondrop_edge.manifest import read_manifest
from visiondrop_edge.prompt import build_prompts, pad_token_id, random_images
from visiondrop_edge.runtime.generate import greedy_generate
from visiondrop_edge.runtime.ort_backend import OrtBackend
from visiondrop_edge.runtime.torch_backend import TorchBackend
from visiondrop_edge.schedule import SCOPES, CropGrid, Schedule

NEW_TOKENS = 8
TOL = {"rtol": 1e-4, "atol": 1e-4}
PROMPTS = ["What is in this picture?", "Describe the image in one long sentence, please."]  # unequal: left padding
# (height, width) of an image of each grid class under HF's (height, width) pinpoints, rows x cols.
SIZES = {(1, 2): (300, 500), (2, 1): (500, 300), (2, 2): (700, 700), (1, 3): (200, 700), (3, 1): (700, 200)}


@pytest.fixture(scope="module")
def tiny_next():
    return load_model("tiny-next")


@pytest.fixture(scope="module")
def tiny_next_eager(tiny_next):
    """An independent copy with HF's eager attention, for the naive reference."""
    return LlavaNextForConditionalGeneration.from_pretrained(builtin_dir("tiny-next"), attn_implementation="eager").eval()


def images_of(size: tuple[int, int], count: int, seed: int):
    height, width = size
    return [image.resize((width, height)) for image in random_images(count, seed=seed, size=max(size))]


def processed(loaded, size, count=2, seed=0):
    out = loaded.processor.image_processor(images_of(size, count, seed), return_tensors="pt")
    return out["pixel_values"], out["image_sizes"]


def prompt_batch(loaded, schedule, prompts=PROMPTS):
    return build_prompts(loaded.tokenizer, loaded.template, prompts, schedule.image_tokens, loaded.config.image_token_id,
                         pad_token_id(loaded.tokenizer))


# ------------------------------------------------------------------ the budget rule (issue 15, decision 3)
def test_budget_320_on_a_2x2_grid_is_the_issue_schedule():
    schedule = Schedule.from_budget(320, 32, 576, grid=CropGrid(2, 2))
    assert (schedule.vision.dominant, schedule.vision.contextual) == (84, 12)  # the 1.5 schedule for 320 / 5 = 64
    assert schedule.image_tokens == 480
    assert [schedule.image_tokens] + [s.total for s in schedule.llm_stages] == [480, 350, 260, 190]
    assert schedule.average_tokens() == 320


@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("budget", [160, 320, 640])
def test_smaller_grids_get_proportionally_fewer_tokens(rows, cols, budget):
    """Every view gets LLaVA-1.5's schedule for B / 5; the LLM stages keep (M + 1) times its counts."""
    grid = CropGrid(rows, cols)
    schedule = Schedule.from_budget(budget, 32, 576, grid=grid)
    per_view = Schedule.from_budget(budget // 5, 32, 576)
    assert schedule.vision == per_view.vision
    assert [s.total for s in schedule.llm_stages] == [grid.views * s.total for s in per_view.llm_stages]
    assert schedule.average_tokens() == pytest.approx(budget * grid.views / 5)


def test_base_scope_reproduces_the_released_code_counts():
    """VISIONDROP_NEXT_REFERENCE.md section 4: the repo's flags on a 2x2 grid give 240, 227, 218
    and 211 visual tokens per layer group, an average of 224 (M = 2: 128, M = 3: 176)."""
    text = "42+6,8:30+5,16:22+4,24:16+3"
    schedule = Schedule.parse(text, 32, 576, grid=CropGrid(2, 2), scope="base")
    assert schedule.tokens_per_layer()[::8] == [240, 227, 218, 211]
    assert schedule.average_tokens() == 224
    assert Schedule.parse(text, 32, 576, grid=CropGrid(1, 2), scope="base").average_tokens() == 128
    assert Schedule.parse(text, 32, 576, grid=CropGrid(3, 1), scope="base").average_tokens() == 176


def test_explicit_per_view_schedules_and_serialisation():
    grid = CropGrid(2, 2)
    explicit = Schedule.parse("84+12,8:60+10,16:44+8,24:32+6", 32, 576, grid=grid)
    assert explicit == Schedule.from_budget(320, 32, 576, grid=grid)
    assert Schedule.from_dict(explicit.to_dict()) == explicit
    # a pruned schedule depends on the grid class only: the unpadded grid of the image is dropped
    assert Schedule.from_budget(320, 32, 576, grid=CropGrid(2, 2, (40, 48))) == explicit
    full = Schedule.from_budget("full", 32, 576, grid=CropGrid(2, 2, (40, 48)))
    assert Schedule.from_dict(full.to_dict()) == full and full.image_tokens == 576 + 40 * 49


@pytest.mark.parametrize("text, scope, fragment", [
    ("84+12,8:500+10", "block", "must not grow"),  # 2x2: 480 tokens enter the LLM
    ("84+12,8:97+1", "base", "must not grow"),  # base scope: the base view's 96
    ("84+12", "sideways", "scope 'sideways' is not one of block, base"),
])
def test_bad_multi_crop_schedules_are_refused(text, scope, fragment):
    with pytest.raises(UserError, match=fragment):
        Schedule.parse(text, 32, 576, grid=CropGrid(2, 2), scope=scope)
    with pytest.raises(UserError, match="needs its unpadded patch grid"):
        Schedule.full(32, 576, grid=CropGrid(2, 2))


# ------------------------------------------------------------------ the preset and the family's grids
def test_tiny_next_is_a_real_llava_next_checkpoint(tiny_next):
    assert isinstance(tiny_next.model, LlavaNextForConditionalGeneration) and tiny_next.family is LlavaNext
    assert type(tiny_next.processor).__name__ == "LlavaNextProcessor"
    pinpoints = {tuple(p) for p in tiny_next.config.image_grid_pinpoints}
    assert pinpoints == {(336 * r, 336 * c) for r, c in SIZES}  # every grid class of LLaVA-NeXT's defaults
    again = load_model("tiny-next")  # deterministic: the same weights on every build
    assert all(torch.equal(a, b) for a, b in zip(tiny_next.model.state_dict().values(), again.model.state_dict().values()))


@pytest.mark.parametrize("size", [*SIZES.values(), (200, 200), (336, 336), (1000, 800), (333, 1001)])
def test_crop_grid_and_full_count_follow_hf(tiny_next, size):
    """The grid is HF's (ties included: a small image is 1x2 under HF's (height, width) reading),
    the views are the processor's and the full budget's token count is what the processor expands."""
    grid = tiny_next.crop_grid(size)
    assert (grid.rows, grid.cols) == get_anyres_image_grid_shape(list(size), tiny_next.config.image_grid_pinpoints, 336)
    pixels, _ = processed(tiny_next, size, count=1)
    assert pixels.shape[1] == grid.views
    image = images_of(size, 1, seed=0)
    text = tiny_next.processor(images=image, text=[tiny_next.template.first_turn.format(prompt="hi")], return_tensors="pt")
    expanded = int((text["input_ids"] == tiny_next.config.image_token_id).sum())
    assert tiny_next.schedule("full", grid=grid).image_tokens == expanded


def test_the_pipeline_refuses_another_grids_views(tiny_next):
    backend = TorchBackend(tiny_next, tiny_next.schedule(320, grid=CropGrid(2, 2)))
    pixels, _ = processed(tiny_next, SIZES[(1, 2)], count=1)
    with pytest.raises(InputError, match="do not hold the 5 views of a 2x2 crop grid"):
        backend.encode_image(pixels)


# ------------------------------------------------------------------ full budget == HF generate
@pytest.mark.parametrize("size", [*SIZES.values(), (200, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_budget_reproduces_hf_generate(tiny_next, size):
    """No pruning is HF's LLaVA-NeXT: unpad and one newline per row included."""
    pixels, image_sizes = processed(tiny_next, size, seed=sum(size))
    schedule = tiny_next.schedule("full", grid=tiny_next.crop_grid(size))
    batch = prompt_batch(tiny_next, schedule)
    ours = greedy_generate(TorchBackend(tiny_next, schedule), pixels, batch, NEW_TOKENS)
    hf = tiny_next.model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, image_sizes=image_sizes,
        max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    assert ours.tokens.tolist() == hf.sequences[:, batch.input_ids.shape[1]:].tolist()
    for step, (mine, theirs) in enumerate(zip(ours.step_logits, hf.logits)):
        torch.testing.assert_close(mine, theirs, **TOL, msg=lambda m: f"step {step}: {m}")


# ------------------------------------------------------------------ pruned: batched == naive reference
CASES = [(grid, 320, "block") for grid in SIZES] + [((2, 2), 160, "block"), ((1, 3), 640, "block"),
                                                    ((2, 2), 320, "base"), ((2, 1), 160, "base"), ((3, 1), 640, "base")]


@pytest.mark.parametrize("grid, budget, scope", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_batched_pipeline_matches_naive_reference(tiny_next, tiny_next_eager, grid, budget, scope):
    size = SIZES[grid]
    pixels, _ = processed(tiny_next, size, seed=budget + grid[0] * 10 + grid[1])
    schedule = tiny_next.schedule(budget, grid=tiny_next.crop_grid(size), scope=scope)
    assert (schedule.grid.rows, schedule.grid.cols) == grid
    result = greedy_generate(TorchBackend(tiny_next, schedule), pixels, prompt_batch(tiny_next, schedule), NEW_TOKENS)
    batched_stages = [result.vision.stage, *result.stages]
    for b, prompt in enumerate(PROMPTS):
        ids = tiny_next.tokenizer(tiny_next.template.first_turn.format(prompt=prompt)).input_ids
        naive = naive_generate(tiny_next_eager, pixels[b], ids, tiny_next.config.image_token_id, schedule, NEW_TOKENS,
                               tiny_next.config.text_config.eos_token_id)
        assert len(naive.stages) == len(batched_stages) == 4
        for number, (ours, ref) in enumerate(zip(batched_stages, naive.stages)):
            assert ours.kept_index[b].tolist() == ref.kept, f"sample {b} stage {number}: kept differ"
            assert ours.target_index[b].tolist() == ref.targets, f"sample {b} stage {number}: targets differ"
        torch.testing.assert_close(result.vision.image_embeds[b], naive.image_embeds, **TOL)
        for step, (ours, ref) in enumerate(zip(result.step_logits, naive.step_logits)):
            torch.testing.assert_close(ours[b], ref, **TOL, msg=lambda m: f"step {step}: {m}")
        assert result.tokens[b].tolist()[: len(naive.tokens)] == naive.tokens


def test_forced_choices_map_back_to_their_views(tiny_next):
    """validate replays a candidate's choices in the image's numbering: replaying the pipeline's
    own must give the same block, and a choice moved to another token must change it."""
    schedule = tiny_next.schedule(160, grid=CropGrid(2, 1))
    backend = TorchBackend(tiny_next, schedule)
    pixels, _ = processed(tiny_next, SIZES[(2, 1)], seed=5)
    first = backend.encode_image(pixels)
    backend.forced[0] = first.stage.choice
    assert torch.equal(backend.encode_image(pixels).image_embeds, first.image_embeds)
    moved = first.stage.kept_index.clone()
    view_tokens = 577
    last_crop = moved[:, -schedule.vision.dominant:]  # the last view's kept tokens, in the image's numbering
    free = sorted(set(range(2 * view_tokens + 1, 3 * view_tokens)) - set(last_crop[0].tolist()))[0]
    last_crop[0, -1] = free
    backend.forced[0] = type(first.stage.choice)(moved, first.stage.assignment)
    assert not torch.equal(backend.encode_image(pixels).image_embeds[0], first.image_embeds[0])


def test_a_next_config_finds_its_family_and_bad_pinpoints_are_refused(tiny_next):
    config = tiny_next.config.to_dict()
    assert family_for_config(config, "ckpt") is LlavaNext
    with pytest.raises(CheckpointError, match="image_grid_pinpoints must be \\[height, width\\] pairs of whole multiples"):
        family_for_config(config | {"image_grid_pinpoints": [[336, 500]]}, "ckpt")


# ------------------------------------------------------------------ export: every grid class in one folder
@pytest.fixture(scope="module", params=SCOPES)
def next_artifacts(tiny_next, tmp_path_factory, request):
    """``export --budget 320`` of tiny-next in one LLM-stage scope: (scope, folder)."""
    out = tmp_path_factory.mktemp("next") / request.param
    export_artifacts(tiny_next, tiny_next.schedule(320, scope=request.param), out, ExportOptions(max_seq_len=1024))
    return request.param, out


def test_one_folder_holds_every_grid_class_and_shares_the_weights(next_artifacts):
    """Decision 4: a vision graph per grid class and a prune graph per block size (block scope:
    per crop count; base scope: one, the base view's block), one set of qkv_0/decoder graphs."""
    scope, out = next_artifacts
    manifest = read_manifest(out)
    names = {g.name for g in manifest.graphs}
    assert {n for n in names if n.startswith("vision_")} == {"vision_encoder"} | {f"vision_layout_{r}x{c}" for r, c in SIZES}
    views = (3, 4, 5) if scope == "block" else (None,)
    assert {n for n in names if n.startswith("prune_")} == {
        f"prune_{s}" + (f"_{v}views" if v else "") for s in range(3) for v in views}
    assert {n for n in names if n.startswith(("qkv_", "decoder_"))} == {"qkv_0"} | {f"decoder_{g}" for g in range(4)}
    assert all(data_dependent_shapes(onnx.load(str(path))) == [] for path in out.glob("*.onnx"))
    tower = {o["name"]: o["shape"] for o in manifest.graph_named("vision_encoder").outputs}
    assert tower["image_embeds"] == ["batch_size", 96, 64] and tower["kept_index"] == ["batch_size", 84]  # one view per row
    for rows, cols in SIZES:  # the image: (M + 1) views of the per-view 84+12 (320 / 5 = 64 per view)
        outputs = {o["name"]: o["shape"] for o in manifest.graph_named(f"vision_layout_{rows}x{cols}").outputs}
        assert outputs["image_embeds"][1] == (rows * cols + 1) * 96 and outputs["kept_index"] == ["batch_size", (rows * cols + 1) * 84]
    for entry in manifest.graphs:  # every weight is stored once: the tower's in vision_encoder, the decoder's in qkv/decoder
        graph = onnx.load(str(out / entry.file))
        weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64]
        if entry.role in ("layout", "prune"):
            assert weights == [], f"{entry.name} holds {[w.name for w in weights]}"
    # TensorRT: the per-view encoder takes every view of up to max_batch images (3 to 5 views a grid class, opt the 2x2's)
    engines = {e.graph: e for e in plan_build(out, BuildOptions(max_batch=2)).engines}
    assert engines["vision_encoder"].profiles[0].axes == {"batch_size": [3, 5, 10]}
    assert all(engines[f"vision_layout_{r}x{c}"].profiles[0].axes == {"batch_size": [1, 1, 2]} for r, c in SIZES)


@pytest.mark.parametrize("rows, cols", list(SIZES))
def test_onnx_runtime_picks_the_grid_class_from_the_image_and_matches_torch(tiny_next, next_artifacts, rows, cols):
    """The runtime binds each image's grid class (``for_images``) and generates what PyTorch does:
    the same choices at every stage, the same tokens, logits to rounding (test_pipeline's
    tolerance, fp32 on both sides)."""
    scope, out = next_artifacts
    size = SIZES[(rows, cols)]
    pixels, image_sizes = processed(tiny_next, size, seed=77)
    ort = OrtBackend(out, provider="cpu").for_images(image_sizes.tolist())
    reference = TorchBackend(tiny_next, tiny_next.schedule(320, scope=scope)).for_images(image_sizes.tolist())
    assert ort.spec.schedule == reference.spec.schedule == tiny_next.schedule(320, grid=CropGrid(rows, cols), scope=scope)
    batch = prompt_batch(tiny_next, ort.spec.schedule)
    calls, run = [], ort._run
    ort._run = lambda graph, *tensors: calls.append((graph, [t.shape for t in tensors])) or run(graph, *tensors)
    ours, theirs = greedy_generate(reference, pixels, batch, NEW_TOKENS), greedy_generate(ort, pixels, batch, NEW_TOKENS)
    # TensorRT's profiles (`build`, planned without TensorRT) hold every shape this image's run fed each graph
    engines = {e.graph: e for e in plan_build(out, BuildOptions(max_batch=2)).engines}
    for graph, shapes in calls:
        inputs = [t["name"] for t in read_manifest(out).graph_named(graph).inputs]
        assert any(_fits(profile, inputs, shapes) for profile in engines[graph].profiles), \
            f"{graph} {shapes} outside {[p.axes for p in engines[graph].profiles]}"
    for number, (a, b) in enumerate(zip([ours.vision.stage, *ours.stages], [theirs.vision.stage, *theirs.stages])):
        assert torch.equal(a.kept_index, b.kept_index) and torch.equal(a.target_index, b.target_index), f"stage {number}"
    assert ours.tokens.tolist() == theirs.tokens.tolist()
    for step, (a, b) in enumerate(zip(ours.step_logits, theirs.step_logits)):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"step {step}: {m}")


def _fits(profile, inputs, shapes) -> bool:
    """Every input's every dimension within the profile's [min, max]."""
    return all(low <= size <= high for name, shape in zip(inputs, shapes)
               for low, size, high in zip(profile.shapes[name][0], shape, profile.shapes[name][2]))


def test_a_batch_must_share_one_grid_class(tiny_next, next_artifacts):
    _, out = next_artifacts
    with pytest.raises(InputError, match=r"share one crop grid \(image 1: 1x2, image 2: 2x2\): run them in separate batches"):
        OrtBackend(out, provider="cpu").for_images([SIZES[(1, 2)], SIZES[(2, 2)]])


def test_unpruned_next_graphs_hold_one_image_size(tiny_next, tmp_path):
    """Without pruning HF unpads per image, so an unpruned export has the shapes of one image
    size (by default a square one filling the 2x2 pinpoint): others are refused by name."""
    out = tmp_path / "full"
    export_artifacts(tiny_next, tiny_next.schedule("full"), out, ExportOptions(max_seq_len=4096))
    backend = OrtBackend(out, provider="cpu")
    assert backend.for_images([(672, 672)]).spec.schedule.image_tokens == 576 + 48 * 49
    with pytest.raises(InputError, match=r"no shapes for an image cut into 1x2 \(24x40 patches unpadded\).*2x2 \(48x48"):
        backend.for_images([SIZES[(1, 2)]])


def test_a_mistral_next_is_exact_only_within_its_sliding_window(tiny_next):
    """Decision 5: a Mistral decoder (GQA, sliding window) is the family layer's rule, unchanged."""
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32768, sliding_window=4096)
    config = LlavaNextConfig(vision_config=tiny_next.config.vision_config, text_config=text)
    assert family_for_config(config.to_dict(), "ckpt") is LlavaNext
    assert LlavaNext.max_positions(config) == (4096, "the decoder's sliding_window (VisionDrop's attention has no window)")


# ------------------------------------------------------------------ the commands, on a local checkpoint folder
def test_export_generate_and_validate_a_next_checkpoint_folder(tiny_next, tmp_path):
    """Done-when: the LLaVA-1.5 commands, unchanged, on a LLaVA-NeXT folder. ``generate`` on the
    artifacts picks each image's grid class and answers what the PyTorch pipeline on that
    grid's schedule (built here directly, not through the CLI) answers; ``validate`` passes
    on every grid class."""
    from click.testing import CliRunner
    from PIL import Image

    from visiondrop_edge import cli

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    folder, out = builtin_dir("tiny-next"), tmp_path / "artifacts"
    exported = invoke("export", "--model", folder, "--budget", "160", "--anyres-llm-stages", "base", "--out", out, "--json", "-")
    assert exported.exit_code == 0, exported.output
    report = json.loads(exported.stdout)
    assert {g["grid"] for g in report["crop_grids"]} == {f"{r}x{c}" for r, c in SIZES}
    assert read_manifest(out).spec["schedule"]["scope"] == "base"
    for (rows, cols), (height, width) in [((1, 2), SIZES[(1, 2)]), ((3, 1), SIZES[(3, 1)])]:
        path = tmp_path / f"{rows}x{cols}.png"
        images_of((height, width), 1, seed=rows)[0].save(path)
        answered = invoke("generate", "--artifacts", out, "--image", path, "--prompt", PROMPTS[0], "--max-new-tokens", NEW_TOKENS, "--json", "-")
        assert answered.exit_code == 0, answered.output
        answer = json.loads(answered.stdout)
        schedule = tiny_next.schedule(160, grid=CropGrid(rows, cols), scope="base")
        assert answer["crop_grid"] == f"{rows}x{cols}" and answer["average_tokens_per_layer"] == schedule.average_tokens()
        pixels = tiny_next.processor.image_processor([Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
        direct = greedy_generate(TorchBackend(tiny_next, schedule), pixels, prompt_batch(tiny_next, schedule, PROMPTS[:1]), NEW_TOKENS)
        assert answer["generated_ids"] == direct.tokens.tolist()
    checked = invoke("validate", "--artifacts", out, "--batch", "1", "--max-new-tokens", "3", "--json", "-")
    assert checked.exit_code == 0, checked.output
    validation = json.loads(checked.stdout)
    assert validation["passed"] and {case["crop_grid"] for case in validation["cases"]} == {f"{r}x{c}" for r, c in SIZES}


def test_commands_without_multi_crop_support_refuse_next_by_name(next_artifacts, tmp_path):
    """calibrate, triton-repo and serve handle one view per image: a NeXT folder or model gets a
    one-line error saying what to run instead, not a crash deep inside."""
    from click.testing import CliRunner

    from visiondrop_edge import cli

    _, out = next_artifacts
    for args, fragment in [
        (["calibrate", "--artifacts", out, "--precision", "int8", "--out", tmp_path / "q"], "which calibrate does not handle yet"),
        (["triton-repo", "--artifacts", out, "--out", tmp_path / "repo"], "which triton-repo does not handle yet"),
        (["serve", "--model", "tiny-next"], "serve runs one-view models (LLaVA-1.5) for now"),
    ]:
        result = CliRunner().invoke(cli.cli, [str(a) for a in args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and fragment in lines[-1] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "repo").exists()


def test_bench_vision_flops_count_every_view(tiny_next):
    """bench's analytic vision FLOPs against torch's FlopCounterMode on the pipeline's own vision
    unit (2 images of 5 views). Unpruned the two count the same matmuls (patch embedding, the
    tower's layers up to the feature layer, the projector on every view's patches): equal to
    float rounding. Pruned, the tower and projector are as exact; the stage-0 prune is counted
    as the algorithm's minimum (scores against CLS, merge similarity at head width, the merge as
    adds) where the implementation's one-hot and full-width products count more: under 1% of
    the vision FLOPs at every budget (0.24% at 320, 0.13% at 160 on this model)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from visiondrop_edge.bench.flops import stage_flops
    from visiondrop_edge.pruning import REFERENCE_OPS

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}  # CPU's SDPA kernel, uncounted by default
    pixels, _ = processed(tiny_next, SIZES[(2, 2)])
    for budget, rel in (("full", 1e-9), ("160", 1e-2), ("320", 1e-2), ("640", 1e-2)):
        schedule = tiny_next.schedule(budget)
        unit = tiny_next.family.pipeline_vision(tiny_next.model, schedule, REFERENCE_OPS)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.inference_mode():
            unit(pixels)
        assert stage_flops(tiny_next.config, schedule, text_tokens=10, batch=2)["vision"] == pytest.approx(counter.get_total_flops(), rel=rel)


@pytest.mark.parametrize("scope, backend", [("block", "torch"), ("base", "torch"), ("block", "ort")])
def test_bench_next_measures_2x2_images_against_full(tiny_next, tmp_path, scope, backend):
    """bench on a NeXT model: 2x2 images (the grid the budget is defined on), the issue's counts
    entering each decoder group (480 -> 350 -> 260 -> 190 at 320 in block scope; base scope
    prunes the base view's 96 and carries the crops' 384), checked through the KV bytes; the
    full baseline holds HF's token count for the image; the ideal baseline gets every view's share."""
    from click.testing import CliRunner

    from visiondrop_edge import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli.cli, ["bench", "--model", "tiny-next", "--backend", backend, "--budgets", "320", "--anyres-llm-stages", scope,
                                          "--batch", "1", "--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"pruned", "ideal", "full"} and {r["crop_grid"] for r in rows.values()} == {"2x2"}
    image = images_of(SIZES[(2, 2)], 1, seed=0)
    text = tiny_next.processor(images=image, text=[tiny_next.template.first_turn.format(prompt="hi")], return_tensors="pt")
    assert rows["full"]["image_tokens"] == int((text["input_ids"] == tiny_next.config.image_token_id).sum())
    entering = [480, 350, 260, 190] if scope == "block" else [480, 70 + 384, 52 + 384, 38 + 384]
    schedule = tiny_next.schedule(320)
    for variant in ("pruned", "ideal"):
        row = rows[variant]
        assert row["image_tokens"] == 480
        # per layer K and V of 1 image x 2 heads x (text + visual + 2 generated) x 16 dims x 4 bytes
        expected = sum(2 * 2 * (row["text_tokens"] + entering[g] + 2) * 16 * 4 * (stop - start)
                       for g, (start, stop) in enumerate(schedule.layer_groups()))
        assert row["kv_cache_bytes"] == expected
    assert rows["ideal"]["flops"]["prefill_total"] < rows["pruned"]["flops"]["prefill_total"] < rows["full"]["flops"]["prefill_total"]


@pytest.mark.parametrize("rows, cols", [(1, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("scope", SCOPES)
def test_inspect_draws_the_crops_kept_patches_on_the_stitched_image(tiny_next, rows, cols, scope):
    """inspect's canvases are the base view and the stitched crops; every patch of both is in
    exactly one token at every stage; the crops' kept patches are drawn where those crops'
    pixels are in the stitched image (found by their pixels: the image fills its pinpoint, so
    no two patches are alike); and the block order is the layout's (each block token's
    embedding is its view's own output, the views run one by one)."""
    from visiondrop_edge.families.llava import ClipVisionUnit
    from visiondrop_edge.inspection import CLS, inspect_image
    from visiondrop_edge.pruning import REFERENCE_OPS

    side, size, views = 24, 14, rows * cols + 1
    image = images_of((336 * rows, 336 * cols), 1, seed=3)[0]
    schedule = tiny_next.schedule(320, scope=scope).for_grid(CropGrid(rows, cols))
    panels, (base, crops) = inspect_image(tiny_next, tiny_next.schedule(320, scope=scope), image, "What is this?")
    assert (base.first_patch, base.columns, base.image.shape) == (0, side, (336, 336, 3))
    assert (crops.first_patch, crops.columns, crops.image.shape) == (side**2, cols * side, (336 * rows, 336 * cols, 3))
    vision = schedule.vision
    assert len(panels) == len(schedule.stages)
    assert (len(panels[0].dominant), len(panels[0].contextual)) == (views * vision.dominant, views * vision.contextual)
    assert panels[0].dominant.count(CLS) == views
    for panel in panels:
        covered = [p for c in panel.dominant_coverage for p in c] + [p for g in panel.contextual for p in g["patches"]]
        assert sorted(covered) == list(range(views * side**2))

    def tiles(picture):  # [H, W, 3] -> row-major patches as bytes
        h, w = picture.shape[0] // size, picture.shape[1] // size
        return [t.tobytes() for t in picture.reshape(h, size, w, size, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)]

    pixels = tiny_next.processor.image_processor([image], return_tensors="pt")["pixel_values"][0]
    processor = tiny_next.processor.image_processor
    seen = (np.clip(pixels.permute(0, 2, 3, 1).numpy() * np.array(processor.image_std) + np.array(processor.image_mean), 0, 1) * 255).astype(np.uint8)
    on_canvas = {tile: crops.first_patch + n for n, tile in enumerate(tiles(crops.image))}
    assert len(on_canvas) == views * side**2 - side**2  # every tile distinct
    backend = TorchBackend(tiny_next, schedule)
    kept = backend.encode_image(pixels[None]).stage.kept_index[0].view(views, -1)
    expected = {on_canvas[tiles(seen[view])[token - 1 - view * (side**2 + 1)]] for view in range(1, views) for token in kept[view, 1:].tolist()}
    assert {p for p in panels[0].dominant if p != CLS and p >= side**2} == expected
    # the block order against the views run one by one
    per_view = ClipVisionUnit(tiny_next.model, vision, REFERENCE_OPS)
    with torch.inference_mode():
        outputs = per_view(pixels)[0].flatten(0, 1)  # [views * (k+c), D], view after view
        embeds = backend.encode_image(pixels[None]).image_embeds[0]
    torch.testing.assert_close(embeds, outputs[backend.pipeline.vision.block_order(kept.flatten())], **TOL)


def test_inspect_cli_on_a_next_image(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from visiondrop_edge import cli

    picture, out = tmp_path / "wide.png", tmp_path / "kept.png"
    images_of(SIZES[(1, 3)], 1, seed=1)[0].save(picture)
    result = CliRunner().invoke(cli.cli, ["inspect", "--model", "tiny-next", "--image", str(picture), "--budget", "160",
                                          "--out", str(out), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["crop_grid"] == "1x3" and data["average_tokens_per_layer"] == pytest.approx(160 * 4 / 5)  # 4 of the 2x2's 5 views
    assert [(c["name"], c["first_patch"], c["rows"], c["columns"]) for c in data["canvases"]] == [
        ("base view", 0, 24, 24), ("crops", 576, 24, 72)]
    views, stage = 4, Schedule.from_budget(160, 8, 576, grid=CropGrid(1, 3)).vision
    assert (len(data["stages"][0]["dominant"]), len(data["stages"][0]["contextual"])) == (views * stage.dominant, views * stage.contextual)
    width, height = Image.open(out).size
    assert width > 3 * height / 2  # four panels a row, two rows (the base view's, the crops' at a third of the height)


def test_plugin_mode_next_validates_on_every_grid_class(tiny_next, tmp_path):
    """`export --plugins` of a NeXT model: one select and one merge node in the per-view encoder
    and in every prune graph, none in the layouts; `validate` (ONNX Runtime's CPU versions of the
    plugins against PyTorch, random images of every grid class) passes at its usual gates."""
    from visiondrop_edge.plugins_trt import MERGE_OP, PLUGIN_DOMAIN, SELECT_OP
    from visiondrop_edge.runtime.validate import validate_artifacts

    out = tmp_path / "plugins"
    export_artifacts(tiny_next, tiny_next.schedule(160), out, ExportOptions(plugins=True, max_seq_len=1024))
    for entry in read_manifest(out).graphs:
        ops = [n.op_type for n in onnx.load(str(out / entry.file)).graph.node if n.domain == PLUGIN_DOMAIN]
        expected = [SELECT_OP, MERGE_OP] if entry.role in ("vision", "prune") else []
        assert ops == expected, entry.name
    report = validate_artifacts(out, batch_sizes=(1,), new_tokens=8, seed=5)
    assert report.passed, [c.name for c in report.checks.values() if not c.passed]
    assert report.gates["relative"] == 1e-4
    assert {case["crop_grid"] for case in report.to_dict()["cases"]} == {f"{r}x{c}" for r, c in SIZES}


def test_a_grid_bound_backend_decodes_on_static_buffers_with_its_own_units(tiny_next):
    """``--cuda-graph`` on a multi-crop model: the copy bound to an image's grid steps its own
    units on static buffers (run eagerly here, as on a GPU before capture), and those steps
    equal its eager steps, tokens forced equal (the static buffers' extra masked slots change
    only the order of the attention sums: TOL)."""
    from visiondrop_edge.runtime.static_decode import StaticDecoder

    backend = TorchBackend(tiny_next, tiny_next.schedule(320))
    backend.static_decoder = StaticDecoder(backend, capture=False)  # what cuda_graph=True sets, minus the capture
    pixels, image_sizes = processed(tiny_next, SIZES[(1, 2)], seed=77)
    bound = backend.for_images(image_sizes.tolist())
    assert bound is not backend and bound.static_decoder.backend is bound
    batch = prompt_batch(tiny_next, bound.spec.schedule)
    vision = bound.encode_image(pixels)
    prefill = bound.prefill(batch.input_ids, vision.image_embeds, batch.attention_mask, batch.image_offset)
    eager_logits, eager_state, static_state = prefill.logits, prefill.state, prefill.state
    for step in range(NEW_TOKENS):
        tokens = eager_logits.argmax(-1)
        eager_logits, eager_state = super(TorchBackend, bound).decode_step(tokens, eager_state)  # Backend's eager step
        static_logits, static_state = bound.decode_step(tokens, static_state)
        torch.testing.assert_close(static_logits, eager_logits, **TOL, msg=lambda m: f"step {step}: {m}")

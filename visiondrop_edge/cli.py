"""VisionDrop Edge: fixed-budget visual-token pruning for LLaVA, from checkpoint to deployable graphs."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from visiondrop_edge.errors import UserError
from visiondrop_edge.schedule import SCOPES

MODEL_HELP = "Built-in preset (tiny, small, llava-1.5-7b-shape) or a local Hugging Face LLaVA checkpoint folder."
BUDGET_HELP = "Average visual tokens per LLM layer (e.g. 32, 64, 128, 192), or 'full' for no pruning. Default 128."
SCHEDULE_HELP = "Explicit schedule instead of --budget, e.g. '42+6,8:30+5,16:22+4,24:16+3' (vision k+c, then layer:k+c)."


def quiet_libraries() -> None:
    """Silence library progress bars and log chatter that say nothing to a CLI user (warnings
    are filtered where they are understood, e.g. the exporter's)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    notes = logging.getLogger("visiondrop")  # notes such as "removed a leftover of an interrupted write"
    if not notes.handlers:
        notes.addHandler(ClickHandler())


class ClickHandler(logging.Handler):
    """Log records as lines on the current stderr (click's, so tests capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def option_spelling(parameter: str) -> str:
    """A library setting's name as this CLI's option (``max_seq_len`` -> ``--max-seq-len``)."""
    return "--" + parameter.replace("_", "-")


def user_errors(command):
    """Print a :class:`UserError` as one line on stderr and exit 2, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            message = exc.spelled(option_spelling)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)

    return wrapper


def progress(message: str) -> None:
    click.echo(message, err=True)


class DeviceType(click.ParamType):
    """A torch device a user may run on: cpu, cuda or cuda:N (meta and the like are refused)."""

    name = "cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        kind, _, index = text.partition(":")
        if text == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
            return text
        self.fail(f"'{value}' is not a device: use cpu, cuda or cuda:N", param, ctx)


DEVICE = DeviceType()
STDOUT = "-"  # --json's value for "print it": a str, so that a file given as ./- stays a Path
BARE_JSON = ""  # what Click passes for --json given no value (the old flag): refused with the new spelling


class JsonTarget(click.ParamType):
    """``--json PATH`` writes a file, ``--json -`` prints; the old bare flag gets one line with the new spelling."""

    name = "PATH|-"

    def convert(self, value, param, ctx):
        text = str(value)
        if text == BARE_JSON:
            self.fail("a bare --json no longer prints: give --json - to print the JSON, or --json PATH to write it", param, ctx)
        if text == STDOUT:
            return STDOUT
        if text.startswith("-"):
            self.fail(f"'{text}' is an option, not a file: give --json a PATH, or '-' to print the JSON", param, ctx)
        return click.Path(dir_okay=False, path_type=Path).convert(text, param, ctx)


# Opsets the exporter handles: 17 is what TensorRT 10.3 parses; torch's TorchScript-based
# exporter (dynamo=False) writes up to 20.
MIN_OPSET, MAX_OPSET = 17, 20


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but PyTorch sees no CUDA GPU: use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_outputs(**paths) -> None:
    """Refuse unwritable output files before any model loads (name: path, None skipped)."""
    from visiondrop_edge.loading import check_writable

    for option, path in paths.items():
        if path is not None and path != STDOUT:
            check_writable(path, f"--{option.replace('_', '-')}")


def write_side_file(path: Path, write) -> None:
    """Write an output file after the work is done (parents created); a failure is one error line."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise UserError(f"could not write {path} ({exc.strerror or exc}); the results above are complete") from None


def write_report(path: Path | str | None, report) -> None:
    """``--json``: the command's report on stdout (``-``) or in PATH, written after the work (see write_side_file)."""
    from visiondrop_edge.trace import write_json

    if path == STDOUT:
        click.echo(json.dumps(report))
    elif path is not None:
        write_side_file(path, lambda target: write_json(target, report))
        progress(f"wrote {path}")


def shows_table(json_path: Path | str | None) -> bool:
    """The human-readable output goes to stdout unless ``--json -`` claims it."""
    return json_path != STDOUT


def check_cuda_graph(cuda_graph: bool, torch_backend: bool, device: str) -> None:
    """``--cuda-graph`` records the PyTorch backend's calls on a GPU: refused elsewhere, before anything loads."""
    if cuda_graph and not (torch_backend and device.startswith("cuda")):
        raise UserError("--cuda-graph replays recorded CUDA graphs of the PyTorch backend: use it with --backend torch --device cuda "
                        "(not with --artifacts or --engines, whose graphs run as exported)")


def open_torch(model: str, budget, schedule, device: str, conversation: str | None = None, scope: str = "block",
               cuda_graph: bool = False):
    """(backend, processor, source, (max sequence, what sets it)) for the PyTorch pipeline."""
    from visiondrop_edge.runtime.torch_backend import TorchBackend
    from visiondrop_edge.loading import load_model

    check_device(device)
    progress(f"loading {model} ...")
    loaded = load_model(model, device=device, conversation=conversation)
    backend = TorchBackend(loaded, loaded.schedule(budget, schedule, scope=scope), cuda_graph=cuda_graph)
    return backend, loaded.processor, loaded.source, loaded.max_positions


def open_artifacts(directory: Path, provider: str):
    """(backend, processor, source, (max sequence, what sets it)) for an artifact folder on ONNX Runtime."""
    from visiondrop_edge.runtime.base import single_threaded_glue
    from visiondrop_edge.runtime.ort_backend import OrtBackend
    from visiondrop_edge.errors import ArtifactError
    from visiondrop_edge.loading import load_processor

    progress(f"loading artifacts {directory} ...")
    single_threaded_glue()
    backend = OrtBackend(directory, provider=provider)
    limit = (backend.manifest.export["max_seq_len"], "the artifacts' --max-seq-len")
    return backend, load_processor(directory, ArtifactError, "re-run export"), backend.manifest.model["source"], limit


def open_engines(engines: Path, artifacts: Path | None):
    """(backend, processor, source, (max sequence, what sets it)) for a TensorRT engine folder."""
    from visiondrop_edge.runtime.base import single_threaded_glue
    from visiondrop_edge.runtime.trt_backend import TrtBackend
    from visiondrop_edge.errors import ArtifactError
    from visiondrop_edge.loading import load_processor

    progress(f"loading engines {engines} ...")
    single_threaded_glue()
    backend = TrtBackend(engines, artifacts)
    limit = (backend.build["max_seq_len"], "the engines' --max-seq-len")
    processor = load_processor(backend.artifacts, ArtifactError, "re-run export")
    return backend, processor, backend.manifest.model["source"], limit


def open_backend(backend_name, model, artifacts, engines, provider, budget, schedule, device, conversation=None, scope="block",
                 cuda_graph=False):
    """The backend a command's --backend/--model/--artifacts/--engines options name (see open_*)."""
    check_cuda_graph(cuda_graph, backend_name in ("auto", "torch") and artifacts is None and engines is None, device)
    if conversation is not None and (artifacts or engines):
        raise UserError("--conversation is fixed at export time (the manifest records it): drop it, or re-export")
    if scope != "block" and (artifacts or engines):
        raise UserError("--anyres-llm-stages is fixed at export time (the manifest records it): drop it, or re-export")
    if backend_name == "torch" and (artifacts or engines) or backend_name == "ort" and (artifacts is None or engines):
        raise UserError("--backend torch runs --model, ort runs --artifacts DIR, trt runs --engines DIR: "
                        "pick the one that matches the folder you gave")
    if backend_name == "trt" or engines is not None:
        if engines is None:
            raise UserError("--backend trt runs an engine folder: give --engines DIR (written by `python cli.py build`)")
        if model is not None or budget is not None or schedule is not None:
            raise UserError("--engines fixes the model and schedule at export time: drop --model/--budget/--schedule")
        return open_engines(engines, artifacts)
    if artifacts is not None:
        if model is not None or budget is not None or schedule is not None:
            raise UserError("--artifacts fixes the model and schedule at export time: drop --model/--budget/--schedule")
        return open_artifacts(artifacts, provider)
    return open_torch(model or "tiny", budget, schedule, device, conversation, scope, cuda_graph)


# ------------------------------------------------------------------ options several commands share: one spelling each

PRECISIONS = ("fp32", "fp16", "bf16")


def model_option(default: str | None):
    """``--model``; None lets a command tell "not given" from tiny (open_backend refuses it beside --artifacts)."""
    return click.option("--model", default=default, show_default=default is not None,
                        help=MODEL_HELP + ("" if default is not None else " Default: tiny."))


scope_option = click.option(
    "--anyres-llm-stages", default="block", show_default=True, type=click.Choice(SCOPES),
    help="LLaVA-NeXT: what the LLM stages prune. block: every view's tokens. base: the base view's "
    "only, carrying the crops' tokens through unpruned (the authors' released code, for parity checks).")


def schedule_options(command):
    """``--budget``, ``--schedule`` and ``--anyres-llm-stages``: the pruning schedule of a model run or export."""
    command = scope_option(command)
    command = click.option("--schedule", default=None, help=SCHEDULE_HELP)(command)
    return click.option("--budget", default=None, help=BUDGET_HELP)(command)


device_option = click.option("--device", default="cpu", show_default=True, type=DEVICE, metavar=DEVICE.name,
                             help="Torch device of the PyTorch pipeline: cpu, cuda or cuda:N (a GPU that is not there is refused before anything loads).")
provider_option = click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                               help="ONNX Runtime provider of the exported graphs; auto: CUDA where onnxruntime-gpu sees a GPU, else CPU.")
dtype_option = click.option("--dtype", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
                            help="Precision of weights and activations (exported graphs: fp32 or fp16; bf16 runs on the PyTorch backend).")
force_option = click.option("--force", is_flag=True, help="Replace --out if it is not empty.")
conversation_option = click.option(
    "--conversation", default=None, help="Prompt recipe of the model family: 'checkpoint' (the processor's chat_template; the default "
    "where it has one), 'plain' (llava-hf's template; the default otherwise) or 'llava_v1' (the original LLaVA-1.5 evaluation: "
    "vicuna_v1 system prompt, chunked tokenisation, images padded to a square). Artifacts keep the one they were exported with.")


def cuda_graph_option(what: str):
    """``--cuda-graph`` (see check_cuda_graph); ``what`` says what the command replays."""
    return click.option("--cuda-graph", is_flag=True, help=f"--backend torch on --device cuda, with no kernel launches or host "
                        f"syncs per layer: {what}.")


def max_new_tokens_option(default: int, help: str):
    """``--max-new-tokens``, the one spelling of "how many tokens to generate" (per-command default and meaning)."""
    return click.option("--max-new-tokens", default=default, show_default=True, type=click.IntRange(1, 4096), help=help)


def json_option(what: str):
    """``--json PATH|-`` on every command that has a machine-readable report (the convention is in the group's help)."""
    return click.option("--json", "json_path", type=JsonTarget(), default=None, is_flag=False, flag_value=BARE_JSON,
                        help=f"Write {what} as JSON to PATH; '-' prints it on stdout instead of the table.")


def backend_options(command):
    """The options that choose the backend a command runs on (see open_backend): one spelling for all."""
    options = [
        model_option(None),
        schedule_options,
        device_option,
        click.option("--artifacts", type=click.Path(path_type=Path), default=None, help="Run an exported artifact folder with ONNX Runtime instead of PyTorch."),
        provider_option,
        click.option("--engines", type=click.Path(path_type=Path), default=None, help="Run the TensorRT engine folder written by `build` (its artifacts are found through its manifest, or give --artifacts)."),
        click.option("--backend", "backend_name", default="auto", show_default=True, type=click.Choice(["auto", "torch", "ort", "trt"]), help="auto: torch for --model, ort for --artifacts, trt for --engines."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """VisionDrop Edge: prune LLaVA's visual tokens to a fixed budget and deploy it.

    \b
    The main job, on the built-in tiny model, then checking and running it:
      python cli.py export --budget 128
      python cli.py validate --artifacts artifacts/tiny-128
      python cli.py generate --artifacts artifacts/tiny-128 --image examples/cat.png --prompt "What is this?"

    \b
    Options spelled and meant the same in every command:
      --json PATH         write the report as JSON to PATH after the work; the table still prints
      --json -            print that JSON on stdout instead of the table (progress stays on stderr);
                          one option and the usual '-', for a file beside the table or for a pipe
      --max-new-tokens N  the most tokens to generate per answer
      --device            cpu, cuda or cuda:N (PyTorch), checked before anything loads
      --provider          ONNX Runtime's: auto (CUDA where onnxruntime-gpu sees a GPU, else CPU), cpu, cuda
      --dtype             fp32, fp16 or bf16 (bf16 on the PyTorch backend only)
    """
    quiet_libraries()


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write the checkpoint to.")
@force_option
@user_errors
def tiny(out: Path, force: bool) -> None:
    """Write the built-in tiny LLaVA-1.5 (seeded random weights) as a Hugging Face checkpoint.

    The folder loads with LlavaForConditionalGeneration.from_pretrained and AutoProcessor,
    like any downloaded checkpoint; '--model tiny' uses a cached copy of it.
    """
    from visiondrop_edge.loading import save_builtin

    path = save_builtin("tiny", out, force=force)
    click.echo(f"wrote {path}")


@cli.command()
@backend_options
@click.option("--image", "images", multiple=True, required=True, type=click.Path(path_type=Path), help="Image file; repeat for a batch.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Question; one for all images, one per image, or several for one image (the image is then encoded once).")
@max_new_tokens_option(32, "Longest answer; greedy decoding stops earlier at the end-of-sequence token.")
@conversation_option
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the pruning trace (schedule, kept/target indices, top-20 first logits, the exact input ids, a sha256 of the pixels) as JSON.")
@cuda_graph_option("every decode step one CUDA graph replay on static cache buffers (recorded at the first step; the image's "
                   "encode and prefill run once, eagerly)")
@json_option("the answers, their token ids, the schedule and the backend")
@user_errors
def generate(model, artifacts, provider, backend_name, engines, images, prompts, budget, schedule, anyres_llm_stages, max_new_tokens,
             device, conversation, trace_path, cuda_graph, json_path) -> None:
    """Answer a question about an image with VisionDrop pruning (greedy decoding).

    Runs the PyTorch pipeline on --model, the exported graphs in --artifacts with ONNX Runtime,
    or the TensorRT engines in --engines (--backend trt).
    """
    from visiondrop_edge.runtime.generate import greedy_generate
    from visiondrop_edge.prompt import build_prompts, check_length, image_sizes, load_images, pixel_values
    from visiondrop_edge.trace import stage_records, top_logits, write_json

    if len(prompts) not in (1, len(images)) and len(images) != 1:
        raise UserError(f"got {len(prompts)} prompts for {len(images)} images: give one prompt, one per image, "
                        "or several for one image")
    check_outputs(trace=trace_path, json=json_path)
    pil_images = load_images(images)
    backend, processor, source, limit = open_backend(backend_name, model, artifacts, engines, provider, budget, schedule, device,
                                                     conversation, anyres_llm_stages, cuda_graph)
    backend = backend.for_images(image_sizes(pil_images, backend.spec.prompt_template))  # a multi-crop model: the images' grid
    plan = backend.spec.schedule
    batch = build_prompts(
        processor.tokenizer, backend.spec.prompt_template, list(prompts) * max(1, len(images) // len(prompts)), plan.image_tokens,
        backend.spec.image_token_id, backend.spec.pad_token_id,
    )
    check_length(batch, max_new_tokens, *limit)
    pixels = pixel_values(processor.image_processor, pil_images, backend.spec.prompt_template)
    progress(f"generating on {backend.name} with schedule {plan.describe()}{grid_note(plan)} (average {plan.average_tokens():g} visual tokens per layer)")
    if len(images) == 1 and len(prompts) > 1:  # one prefill of the image, every question on top of it
        from visiondrop_edge.runtime.session import Session

        session = Session(backend, processor, source)
        [prefix] = session.encode_prefix(pixels)
        progress(f"image encoded once for {len(prompts)} questions")
        result = session.answer([prefix] * len(prompts), list(prompts), max_new_tokens)
        vision_stage, stages = prefix.vision.stage, prefix.stages
    else:
        result = greedy_generate(backend, pixels, batch, max_new_tokens)
        vision_stage, stages = result.vision.stage, result.stages
    answers = processor.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
    if shows_table(json_path):
        for answer in answers:
            click.echo(answer)
    write_report(json_path, {  # after the answers, so a failing write loses nothing computed
        "answers": answers, "generated_ids": result.tokens.tolist(), "schedule": plan.describe(),
        "average_tokens_per_layer": plan.average_tokens(), "backend": backend.name,
        **({"crop_grid": plan.grid.describe(), "image_tokens": plan.image_tokens} if plan.grid else {}),
    })
    if trace_path is not None:
        write_side_file(trace_path, lambda path: write_json(path, {
            "model": source,
            "backend": backend.name,
            "schedule": plan.to_dict(),
            "prompts": list(prompts),
            "images": [str(p) for p in images],
            "stages": stage_records(plan, vision_stage, stages),
            "first_logits_top20": top_logits(result.step_logits[0]),
            "generated_ids": result.tokens.tolist(),
            "conversation": backend.spec.prompt_template.name,
            "input_ids": batch.input_ids.tolist(),  # the image block expanded; left padding where the batch needs it
            "attention_mask": batch.attention_mask.tolist(),
            "pixel_values_sha256": [hashlib.sha256(row.contiguous().numpy().tobytes()).hexdigest() for row in pixels],
        }))
        progress(f"wrote trace {trace_path}")


@cli.command()
@backend_options
@click.option("--image", required=True, type=click.Path(path_type=Path), help="The image to talk about.")
@max_new_tokens_option(64, "Longest answer per turn; greedy decoding stops earlier at the end-of-sequence token.")
@conversation_option
@cuda_graph_option("every decode step one CUDA graph replay on static cache buffers (recorded again at each turn's first "
                   "step, after its question is prefilled eagerly)")
@user_errors
def chat(model, artifacts, provider, backend_name, engines, image, budget, schedule, anyres_llm_stages, max_new_tokens, device,
         conversation, cuda_graph) -> None:
    """Talk about one image in the terminal, one question per line (an empty line or EOF ends).

    The image is pruned and prefilled once; every turn only prefills its own words on top of
    the conversation's KV caches, and answers stream as they are produced.
    """
    from transformers import TextStreamer

    from visiondrop_edge.runtime.session import Session
    from visiondrop_edge.prompt import follow_up_ids, image_sizes, load_images, pixel_values

    picture = load_images([image])
    backend, processor, source, (limit, limit_name) = open_backend(
        backend_name, model, artifacts, engines, provider, budget, schedule, device, conversation, anyres_llm_stages, cuda_graph)
    backend = backend.for_images(image_sizes(picture, backend.spec.prompt_template))
    conversation = Session(backend, processor, source).chat(pixel_values(processor.image_processor, picture, backend.spec.prompt_template))
    plan = backend.spec.schedule
    progress(f"image encoded ({plan.describe()}{grid_note(plan)}, average {plan.average_tokens():g} visual tokens per layer); "
             "ask away, an empty line ends")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        used = conversation.length + len(follow_up_ids(processor.tokenizer, backend.spec.prompt_template, line.strip())) + 2  # + the previous answer's end
        if used + max_new_tokens > limit:
            raise UserError(f"the conversation would pass {limit_name} ({limit} tokens; {used} with this question): "
                            "start a new chat or lower --max-new-tokens")
        streamer = TextStreamer(processor.tokenizer, skip_special_tokens=True)
        conversation.say(line.strip(), max_new_tokens, on_token=lambda token: streamer.put(token.cpu()))
        streamer.end()


def grid_note(plan) -> str:
    """`` on a 2x2 crop grid`` for a multi-crop image's schedule, else nothing."""
    return f" on a {plan.grid.describe()} crop grid, {plan.image_tokens} image tokens" if plan.grid else ""


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{option} takes positive integers separated by commas, e.g. 1,2 (got '{text}')")
    return values


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


@cli.command()
@model_option("tiny")
@schedule_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Artifact folder. Default: artifacts/<model>-<budget>.")
@dtype_option
@click.option("--vision-dtype", default=None, type=click.Choice(PRECISIONS), help="Precision of the CLIP tower and the stage-0 prune (the projector follows --dtype). Default: the same as --dtype. '--dtype fp16 --vision-dtype fp32' is the authors' fp16 evaluation policy.")
@click.option("--opset", default=MIN_OPSET, show_default=True, type=click.IntRange(MIN_OPSET, MAX_OPSET), help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (17 is what TensorRT 10.3 / JetPack 6 parses).")
@click.option("--max-seq-len", default=2048, show_default=True, type=int, help="Longest prompt + generation the artifacts are meant for (recorded for engine builds).")
@click.option("--plugins", is_flag=True, help="Emit each prune's select and merge as one TensorRT plugin node each (VisionDropSelect/VisionDropMerge, namespace visiondrop).")
@conversation_option
@force_option
@json_option("the summary (folder, schedule, graphs with their I/O, files)")
@user_errors
def export(model, budget, schedule, anyres_llm_stages, out, dtype, vision_dtype, opset, max_seq_len, plugins, conversation, force,
           json_path) -> None:
    """Export fixed-budget ONNX graphs (vision, per-group decoder, prune) and a manifest.

    The folder holds one graph per pipeline unit, the text-embedding table, the tokenizer and
    image processor, and manifest.json (model hash, schedule, files' sha256, I/O contract,
    tool versions, validation tolerances). It is written to a temporary folder and renamed,
    so an interrupted export leaves nothing half-written.
    """
    from visiondrop_edge.export.onnx_export import ExportOptions, export_artifacts
    from visiondrop_edge.loading import EXPORT_DTYPES, apply_precision
    from visiondrop_edge.loading import PRESETS, check_target, load_model

    options = ExportOptions(dtype=dtype, vision_dtype=vision_dtype, opset=opset, max_seq_len=max_seq_len, plugins=plugins)
    model_dir = None if model in PRESETS else [Path(model)]
    check_outputs(json=json_path)
    if out is not None:  # refuse a bad --out before the model loads (checked again under the write lock)
        check_target(out, force, protect=model_dir or ())
    progress(f"loading {model} ...")
    loaded = apply_precision(load_model(model, dtype=EXPORT_DTYPES[dtype], conversation=conversation), options.vision_dtype)
    limit, limit_name = loaded.max_positions
    if max_seq_len > limit:
        raise UserError(f"--max-seq-len {max_seq_len} exceeds {limit_name} ({limit}): use at most {limit}")
    plan = loaded.schedule(budget, schedule, scope=anyres_llm_stages)
    if out is None:
        label = "full" if plan.is_full else (budget or ("custom" if schedule else "128"))
        scope = "-base" if anyres_llm_stages != "block" else ""
        out = Path("artifacts") / f"{Path(loaded.source).name}-{label}{scope}{'-plugins' if plugins else ''}"
    progress(f"schedule {plan.describe()}{grid_note(plan)} (average {plan.average_tokens():g} visual tokens per layer) -> {out}")
    if plan.grid is not None:
        progress("crop grids: " + ", ".join(f"{p.grid.describe()} ({p.image_tokens} image tokens, average {p.average_tokens():g})"
                                            for p in plan.for_grids(loaded.family.grid_classes(loaded.crop_layout)))
                 + ("; unpruned graphs have one image size's shapes (HF unpads per image)" if plan.is_full else ""))
    manifest = export_artifacts(loaded, plan, out, options, force=force, progress=progress)
    rows = []
    for entry in manifest.graphs:
        size = (out / entry.file).stat().st_size + ((out / entry.external_data).stat().st_size if entry.external_data else 0)
        first = entry.outputs[0]
        rows.append([entry.name, entry.role, f"{size / 2**20:.1f} MB", f"{first['name']} {first['shape']}"])
    if shows_table(json_path):
        print_table(["graph", "role", "size", "main output"], rows)
        click.echo(f"wrote {len(manifest.files) + 1} files to {out} (manifest: {out / 'manifest.json'})")
    grids = [{"grid": p.grid.describe(), "image_tokens": p.image_tokens, "average_tokens_per_layer": p.average_tokens()}
             for p in plan.for_grids(loaded.family.grid_classes(loaded.crop_layout))] if plan.grid else None
    write_report(json_path, {"out": str(out), "schedule": plan.describe(), "graphs": [g.to_dict() for g in manifest.graphs],
                             "files": manifest.files, **({"crop_grids": grids} if grids else {})})


@cli.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="Float artifact folder written by export (fp32; fp16 for int8/int4-weight, at opset 19+).")
@click.option("--precision", required=True, type=click.Choice(["int8", "fp8", "int4-weight"]), help="int8: Orin, Hopper, Thor. fp8: Hopper, Thor (not Orin). int4-weight: decoder weights only (W4A16), memory-bound decode.")
@click.option("--data", default="builtin", show_default=True, help="Calibration data: a folder of images with prompts.jsonl (one {\"image\": ..., \"prompt\": ...} per line), or 'builtin' (seeded synthetic images, fixed prompts).")
@click.option("--samples", default=None, type=int, help="How many (image, prompt) samples to run. Default: 8 for builtin, every line of prompts.jsonl for a folder.")
@click.option("--opset", default=None, type=int, help="Opset of the quantized graphs. Default: the lowest that carries the precision (int8: the source's, or 19 for fp16 scales; fp8: 19; int4-weight: 21).")
@click.option("--block-size", default=128, show_default=True, type=int, help="int4-weight: input-dimension block that shares one scale.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder to write. Default: <artifacts>-<precision>.")
@force_option
@json_option("the per-graph report and the manifest's quantization record")
@user_errors
def calibrate(artifacts, precision, data, samples, opset, block_size, out, force, json_path) -> None:
    """Quantize an artifact folder: explicit, symmetric Q/DQ graphs for TensorRT, runnable on ONNX Runtime.

    Each graph is calibrated on the inputs it sees when the float folder runs the pipeline
    (the decoder groups see pruned sequences, prefill and decode). Linear layers get Q/DQ
    (weights per output channel, activations per tensor, zero points 0). The prune graphs,
    the stage-0 prune, everything its scores depend on, Softmax, the norms, the LM head and the
    KV cache stay float. The manifest records the method, the data hash and every exclusion.
    """
    from visiondrop_edge.calibration.quantize import CalibrateOptions, calibrate_artifacts

    options = CalibrateOptions(precision=precision, data=data, samples=samples, opset=opset, block_size=block_size)
    out = out if out is not None else artifacts.parent / f"{artifacts.name}-{precision}"
    check_outputs(json=json_path)
    manifest, reports = calibrate_artifacts(artifacts, out, options, force=force, progress=progress)
    if shows_table(json_path):
        print_table(["graph", "role", "quantized linears", "Q/DQ nodes", "size", "worst cosine (calibration inputs)"],
                    [[r.name, r.role, r.quantized_nodes, r.qdq_nodes, f"{r.bytes_before / 2**20:.1f} -> {r.bytes_after / 2**20:.1f} MB",
                      "float (copied)" if r.worst_cosine is None else f"{r.worst_cosine:.5f}"] for r in reports])
        click.echo(f"wrote {out} ({precision}, opset {manifest.export['quantization']['opset']}); "
                   f"check it with: python cli.py validate --artifacts {out}")
    write_report(json_path, {"out": str(out), "quantization": manifest.export["quantization"],
                             "graphs": [r.__dict__ for r in reports]})


@cli.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="Artifact folder written by export.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Engine folder. Default: engines/<artifacts folder name>.")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1, 1024), help="Largest batch the engines accept.")
@click.option("--max-seq-len", default=None, type=click.IntRange(2), help="Longest prompt + generated tokens. Default: the artifacts' --max-seq-len.")
@click.option("--opt-seq-len", default=None, type=click.IntRange(2), help="Typical prompt length, image tokens included, that TensorRT tunes for. Default: image tokens + 32.")
@click.option("--plugin-lib", type=click.Path(dir_okay=False, path_type=Path), default=None, help="libvisiondrop_trt_plugins.so for plugin-mode artifacts. Default: $VISIONDROP_TRT_PLUGINS, else build/plugins_trt/.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None, help="TensorRT timing cache: read if it exists, updated after the build (faster rebuilds).")
@force_option
@click.option("--dry-run", is_flag=True, help="Print the plan (engines, profiles, plugin library, weight bytes) and stop; needs no TensorRT.")
@json_option("the plan (--dry-run) or the engine manifest")
@user_errors
def build(artifacts, out, max_batch, max_seq_len, opt_seq_len, plugin_lib, timing_cache, force, dry_run, json_path) -> None:
    """Build one TensorRT engine per exported graph, for this GPU and TensorRT version.

    Networks are strongly typed (precision comes from the graphs); qkv_0 and decoder engines get
    a prefill and a decode profile, vision and prune engines one. The VisionDrop plugin library
    is loaded before parsing for plugin-mode artifacts. The folder gets a manifest (TensorRT
    version, GPU, plugin library hash, source hashes, profiles, flags) and is written atomically.
    """
    from visiondrop_edge.export.trt_build import BuildOptions, build_engines, default_engines_dir, describe_plan, plan_build
    from visiondrop_edge.runtime.trt_backend import current_environment
    from visiondrop_edge.loading import check_target

    check_outputs(json=json_path)
    plan = plan_build(artifacts, BuildOptions(max_batch, max_seq_len, opt_seq_len, plugin_lib, timing_cache))
    out = out or default_engines_dir(artifacts)
    library = plan.plugin_library or ("NOT FOUND: build it with `python -m visiondrop_edge.plugins_trt.build`" if plan.needs_plugins else "not needed")
    if dry_run:
        if shows_table(json_path):
            print_table(["engine", "profile", "axes (min/opt/max)", "weights", "plugins"], describe_plan(plan))
            weights = sum(e.weight_bytes for e in plan.engines)
            click.echo(f"plan: {len(plan.engines)} engines -> {out}, {weights / 2**20:.1f} MB of weights, plugin library: {library} "
                       f"(dry run: nothing built)")
        return write_report(json_path, {"out": str(out), **plan.to_dict()})
    check_target(out, force)
    environment = current_environment(plan.plugin_library)
    progress(f"building {len(plan.engines)} engines with TensorRT {environment.tensorrt} for {environment.gpu_name} "
             f"(compute capability {environment.compute_capability}) -> {out}")
    manifest = build_engines(plan, out, environment, force=force, progress=progress)
    if shows_table(json_path):
        click.echo(f"wrote {len(manifest['engines'])} engines to {out} (manifest: {out / 'manifest.json'})")
    write_report(json_path, manifest)


@cli.command()
@click.option("--plugin-lib", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Check this plugin library instead of the default locations.")
@json_option("the report (each piece: found, version or what is missing)")
@user_errors
def doctor(plugin_lib, json_path) -> None:
    """Show what this machine has for TensorRT (GPU, CUDA, TensorRT, plugins, ONNX Runtime) and what to install."""
    from visiondrop_edge.runtime import trt_backend

    check_outputs(json=json_path)
    report = trt_backend.doctor(plugin_lib)
    if shows_table(json_path):
        for line in trt_backend.doctor_lines(report):
            click.echo(line)
    write_report(json_path, report)


@cli.command()
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="Artifact folder written by export.")
@click.option("--reference", default="torch", show_default=True, type=click.Choice(["torch"]), help="The backend the candidate is checked against: the PyTorch pipeline of the model the manifest names.")
@click.option("--candidate", default="ort", show_default=True, type=click.Choice(["ort", "trt"]), help="The backend under test: ONNX Runtime over the graphs (on --provider), or the TensorRT engines of --engines.")
@provider_option
@click.option("--engines", type=click.Path(path_type=Path), default=None, help="Engine folder written by `build` (for --candidate trt).")
@json_option("the report (every check, tie and decision, the gates)")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Also compare on this image (repeatable).")
@click.option("--batch", default="1,2", show_default=True, help="Batch sizes of the random-image cases.")
@max_new_tokens_option(16, "Greedy tokens to compare end to end (both backends stop earlier at the end-of-sequence token).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random images.")
@device_option
@user_errors
def validate(artifacts, reference, candidate, provider, engines, json_path, images, batch, max_new_tokens, seed, device) -> None:
    """Compare a candidate backend with the PyTorch pipeline, unit by unit and end to end.

    Each unit gets the inputs its PyTorch twin saw (vision embeddings, kept/target indices and
    merge assignments of every stage, pruned sequences, q/k/v, KV caches, prefill logits), then
    greedy generation runs end to end. Float tensors must meet the precision's relative-error
    and cosine (>= 0.99) gates. A different pruning choice or greedy token passes only as a
    tie: valid under the error the candidate measurably made on that decision's input; the
    report lists every tie, and everything after it is compared with PyTorch re-run on the
    candidate's choices. Exits 1 if any gated check fails.
    """
    from visiondrop_edge.runtime.validate import validate_artifacts

    check_device(device)
    check_outputs(json=json_path)
    if candidate == "ort":  # by default the provider `generate --artifacts` runs on
        from visiondrop_edge.runtime.ort_backend import resolve_providers

        candidate = "ort-cuda" if resolve_providers(provider)[0] == "CUDAExecutionProvider" else "ort"
    report = validate_artifacts(
        artifacts, images=images, batch_sizes=parse_int_list(batch, "--batch"), new_tokens=max_new_tokens,
        seed=seed, candidate=candidate, reference=reference, engines=engines, device=device, progress=progress,
    )
    if shows_table(json_path):
        print_validation(report)
    write_report(json_path, report.to_dict())
    if not report.passed:
        sys.exit(1)


def print_validation(report) -> None:
    """validate's table, tie margins, decisions and verdict line."""
    rows = []
    for c in report.checks.values():
        errors = ["-", "-", "-"] if c.kind != "tensor" else [f"{c.max_abs_err:.3g}", f"{c.max_rel_err:.3g}", f"{c.cosine:.7f}"]
        result = ("pass" if c.passed else "FAIL") if c.gated else ("info: agrees" if c.passed else "info: differs")
        detail = "; ".join(([f"{c.ties} tie(s) (listed below)"] if c.ties else []) + ([c.detail] if c.detail else []))
        rows.append([c.name, *errors, result, detail])
    print_table(["check", "max abs err", "max rel err", "cosine", "result", "detail"], rows)
    for stage, margin in report.margins.items():
        click.echo(f"{stage}: closest reference boundary gap {margin['closest_gap']:.3g}, tie bound {margin['bound']:.3g}")
    for decision in report.decisions:
        click.echo(decision.describe())
    verdict = "PASSED" if report.passed else "FAILED"
    gated = [c for c in report.checks.values() if c.gated]
    relative = report.gates["relative"]
    click.echo(f"{verdict}: {sum(c.passed for c in gated)}/{len(gated)} gated checks, {len(report.ties)} tie(s); "
               f"gates ({report.precision}): {'rel err <= %g, ' % relative if relative is not None else ''}"
               f"cosine >= {report.gates['cosine']:g}, decisions {report.gates['decisions']}; "
               f"{report.candidate} vs {report.reference}")


@cli.command()
@model_option("tiny")
@click.option("--image", required=True, type=click.Path(path_type=Path), help="The image to inspect.")
@click.option("--prompt", default="Describe the image.", show_default=True, help="Question (LLM-stage scores depend on the prompt).")
@schedule_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG to draw (one panel per stage).")
@json_option("the kept patches and contextual groups of every stage")
@conversation_option
@user_errors
def inspect(model, image, prompt, budget, schedule, anyres_llm_stages, out, json_path, conversation) -> None:
    """Draw which image patches each VisionDrop stage keeps.

    One panel per stage (LLM stages mapped back to original patch positions): dominant
    tokens' patches bright with a white outline, each contextual group's patches coloured by
    its target (target outlined). Patch indices are row-major over the patch grid; for a
    LLaVA-NeXT image over its canvases, a row of panels each: the base view (its patches
    first), then the crops stitched into the padded image (the JSON's canvases say where each starts).
    """
    from visiondrop_edge.prompt import pad_token_id
    from visiondrop_edge.inspection import draw, inspect_image, panels_json
    from visiondrop_edge.loading import load_model
    from visiondrop_edge.prompt import build_prompts, check_length, image_sizes, load_images

    if out is None and json_path is None:
        raise UserError("give --out kept.png to draw the panels, --json PATH (or - to print) for them as JSON, or both")
    check_outputs(out=out, json=json_path)
    picture = load_images([image])[0]
    progress(f"loading {model} ...")
    loaded = load_model(model, conversation=conversation)
    plan = loaded.schedule(budget, schedule, scope=anyres_llm_stages)
    if plan.is_full:
        raise UserError("--budget full keeps every patch: nothing to inspect; pick a budget such as 64")
    if plan.grid is not None:
        plan = plan.for_grid(loaded.crop_grid(image_sizes([picture], loaded.template)[0]))
    batch = build_prompts(loaded.tokenizer, loaded.template, [prompt], plan.image_tokens, loaded.config.image_token_id, pad_token_id(loaded.tokenizer))
    check_length(batch, 0, *loaded.max_positions)
    panels, canvases = inspect_image(loaded, plan, picture, prompt)
    write_report(json_path, {"schedule": plan.describe(), "crop_grid": plan.grid.describe() if plan.grid else None,
                             "average_tokens_per_layer": plan.average_tokens(),
                             "patch_size": loaded.config.vision_config.patch_size, "canvases": [c.to_dict() for c in canvases],
                             "stages": panels_json(panels)})
    if out is not None:
        write_side_file(out, lambda path: draw(panels, canvases, loaded.config.vision_config.patch_size, path))
        progress(f"wrote {out}")


@cli.command()
@model_option("small")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "ort", "trt"]), help="Run the PyTorch pipeline, the exported graphs on ONNX Runtime (exported per budget into a temporary folder), or the TensorRT engine folders of --engines.")
@click.option("--engines", "engine_dirs", multiple=True, type=click.Path(path_type=Path), help="--backend trt: an engine folder written by `build` (repeatable, one schedule each; a --budget full one is the speed-up baseline). Uses --batch, --max-new-tokens, --warmup, --repeats, --json.")
@click.option("--budgets", default=None, metavar="B,B,...", help="Budgets to measure; the unpruned model (the baseline) is measured beside each, in the same interleaved loop. Default: the paper's for the model family (LLaVA-1.5: 32,64,128,192; LLaVA-NeXT: 160,320,640, averages for a 2x2 crop grid, whose images bench uses).")
@scope_option
@click.option("--batch", default="1,4", show_default=True, help="Batch sizes.")
@max_new_tokens_option(32, "Decode steps per request: bench runs all of them, end-of-sequence or not, so every budget decodes as many.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0, 100))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 1000), help="Timed requests per configuration (medians reported).")
@device_option
@dtype_option
@provider_option
@json_option("every measurement")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Draw latency and speed-up against budget (PNG).")
@cuda_graph_option("every decode step one CUDA graph replay on static cache buffers, and each vision encode and prefill one "
                   "replay of its recorded call (the prune-units column is then n/a)")
@click.option("--cpu-load", default=0, show_default=True, type=click.IntRange(0, 64), help="Busy worker processes that bench starts for the measurements and stops after (a CPU shared with the application, as on a Jetson).")
@click.option("--contexts", default=None, metavar="N,N,...", help="Also: decode ms/token after the prompt and filler text up to N tokens (e.g. 600,1200,2000), pruned and full, and its growth per 1000 tokens.")
@click.option("--questions-per-image", "questions", default=None, metavar="N,N,...", help="Instead: time per answer when N questions are asked about one image, with prefix reuse (the image prefilled once) against a full prefill per question, per budget. Uses --budgets, --backend torch|ort, --max-new-tokens, --warmup, --repeats, --json.")
@click.option("--artifacts-compare", "compare", default=None, metavar="BASELINE,CANDIDATE", help="Instead: compare two artifact folders of one model on ONNX Runtime in one interleaved run (e.g. a float folder and its calibration). Uses --batch, --max-new-tokens, --warmup, --repeats, --provider, --json.")
@conversation_option
@user_errors
def bench(model, backend, engine_dirs, budgets, anyres_llm_stages, batch, max_new_tokens, warmup, repeats, device, dtype, provider,
          json_path, plot_path, cuda_graph, cpu_load, contexts, questions, compare, conversation) -> None:
    """Measure speed and memory per budget: pruned vs ideal vs full, in one run.

    Per budget and batch: vision encode, prefill (time to first token), decode ms/token and
    tokens/s, peak memory (RSS on CPU, max allocated on CUDA), KV-cache bytes, analytic FLOPs
    per stage, and the 'ideal' counterpart (each stage's exact sequence size, no scoring or
    merging) so that pruning overhead = pruned / ideal - 1 is measured directly. That ratio of
    two timings drifts on a busy machine; 'prune units' is the LLM prune graphs' own time
    inside each pruned prefill, over the rest of that prefill, and 'net of ideal's splices'
    that share less the share the ideal spends on the sequence moves standing in for them.
    """
    import torch

    from visiondrop_edge.bench.plot import plot_bench
    from visiondrop_edge.bench.run import BenchConfig, run_bench
    from visiondrop_edge.loading import load_model

    check_cuda_graph(cuda_graph, backend == "torch", str(device))
    check_device(device)
    check_outputs(json=json_path, plot=plot_path)
    if conversation is not None and (backend == "trt" or engine_dirs or compare is not None):
        raise UserError("--conversation is fixed at export time (the manifests record it): drop it for --engines and --artifacts-compare")
    if backend == "trt" or engine_dirs:
        if backend != "trt" or not engine_dirs:
            raise UserError("TensorRT engines are measured with --backend trt --engines DIR [--engines DIR2 ...]")
        config = BenchConfig(batches=tuple(parse_int_list(batch, "--batch")), new_tokens=max_new_tokens, warmup=warmup,
                             repeats=repeats, backend="trt")
        return bench_engines(list(engine_dirs), config, json_path)
    if compare is not None:
        config = BenchConfig(batches=tuple(parse_int_list(batch, "--batch")), new_tokens=max_new_tokens, warmup=warmup,
                             repeats=repeats, backend="ort", provider=provider)
        return bench_compare(compare, config, json_path)
    budget_list = tuple(b.strip() for b in (budgets or "").split(",") if b.strip())
    if budgets is not None and not budget_list:
        raise UserError(f"--budgets takes budgets separated by commas, e.g. 32,64,full (got '{budgets}')")
    config = BenchConfig(budgets=budget_list, batches=tuple(parse_int_list(batch, "--batch")), new_tokens=max_new_tokens,
                         warmup=warmup, repeats=repeats, backend=backend, provider=provider, cpu_load=cpu_load,
                         contexts=tuple(parse_int_list(contexts, "--contexts")) if contexts else (), scope=anyres_llm_stages,
                         cuda_graph=cuda_graph)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if backend == "ort" and dtype == "bf16":
        raise UserError("--backend ort exports fp32 or fp16 graphs: use --dtype fp32 or fp16")
    counts = parse_int_list(questions, "--questions-per-image") if questions is not None else None
    progress(f"loading {model} ({dtype}, {device}) ...")
    loaded = load_model(model, dtype=torch_dtype, device=device, conversation=conversation)
    if counts is not None:
        return bench_questions(loaded, config, counts, json_path)
    report = run_bench(loaded, config, progress=progress)
    report["config"]["conversation"] = loaded.template.name
    rows = [[s["budget"], s["batch"], f"{s['prefill_speedup']:.2f}x", f"{s['ideal_prefill_speedup']:.2f}x",
             f"{s['fraction_of_ideal_speedup']:.2f}", f"{100 * s['pruning_overhead']:+.1f}%",
             f"{100 * s['pruning_overhead_best']:+.1f}%",
             *(["n/a (replayed)"] * 2 if s["prune_units_overhead"] is None else
               [f"{100 * s['prune_units_overhead']:.1f}% ({100 * s['prune_units_overhead_best']:.1f}%)",
                f"{100 * s['net_prune_overhead']:+.1f}% ({100 * s['net_prune_overhead_best']:+.1f}%)"]), f"{s['ttft_speedup']:.2f}x",
             f"{s['decode_speedup']:.2f}x ({s['decode_speedup_best']:.2f}x)", f"{s['decode_speedup_predicted']:.2f}x",
             f"{s['flops_fraction']:.2f}"] for s in report["summary"]]
    if shows_table(json_path):
        print_table(["budget", "batch", "prefill speed-up", "ideal speed-up", "of ideal", "overhead", "overhead (best)",
                     "prune units (best)", "net of ideal's splices (best)", "TTFT speed-up",
                     "decode speed-up (best)", "decode predicted by bytes", "FLOPs vs full"], rows)
    if shows_table(json_path) and "context" in report:
        slopes = {(s["budget"], s["batch"], s["variant"]): s["ms_per_1000_tokens"] for s in report["context"]["slopes"]}
        print_table(["budget", "batch", "variant", "context", "cache tokens per group", "decode ms/token (best)",
                     "growth ms per 1000 tokens"],
                    [[r["budget"], r["batch"], r["variant"], r["context"], ",".join(map(str, r["cache_tokens"])),
                      f"{r['decode_ms_per_token']['median']:.2f} ({r['decode_ms_per_token']['min']:.2f})",
                      f"{slopes.get((r['budget'], r['batch'], r['variant']), float('nan')):.2f}"] for r in report["context"]["results"]])
    write_report(json_path, report)
    if plot_path is not None:
        write_side_file(plot_path, lambda path: plot_bench(report, path))
        progress(f"wrote {plot_path}")


# ------------------------------------------------------------------ serving on Triton Inference Server

PORT = click.IntRange(1, 65535)


def serving_options(command):
    """What ``serve`` and ``triton-repo`` share: batching, answer lengths, the prefix cache."""
    options = [
        click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Most requests one batched prefill/decode holds (Triton's dynamic batcher)."),
        click.option("--batch-delay-us", default=2000, show_default=True, type=click.IntRange(0, 10_000_000), help="How long the batcher may hold a request to fill a batch, in microseconds."),
        max_new_tokens_option(32, "Answer length for a request that sends no max_new_tokens."),
        click.option("--max-new-tokens-limit", default=256, show_default=True, type=click.IntRange(1, 4096), help="The most tokens a request may ask for."),
        click.option("--prefix-cache-bytes", default=1 << 30, show_default=True, type=click.IntRange(0, None), help="Memory budget of the prefix cache (encoded images; the least recently used go first)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_serving(max_new_tokens: int, max_new_tokens_limit: int) -> None:
    if max_new_tokens > max_new_tokens_limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} is past --max-new-tokens-limit {max_new_tokens_limit}: lower it or raise the limit")


@cli.command()
@backend_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address Triton listens on (0.0.0.0: every interface).")
@click.option("--http-port", default=8000, show_default=True, type=PORT)
@click.option("--grpc-port", default=8001, show_default=True, type=PORT)
@click.option("--metrics-port", default=8002, show_default=True, type=PORT, help="Triton's Prometheus metrics (GET /metrics).")
@serving_options
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where Triton writes its own log (default: a new file in the temp folder, named at start).")
@user_errors
def serve(model, budget, schedule, anyres_llm_stages, device, artifacts, provider, engines, backend_name, host, http_port, grpc_port,
          metrics_port, max_batch, batch_delay_us, max_new_tokens, max_new_tokens_limit, prefix_cache_bytes, log_file) -> None:
    """Serve the pipeline on Triton Inference Server (through PyTriton): HTTP, gRPC and metrics.

    \b
    Clients call the model 'visiondrop' (tritonclient, or any KServe v2 client) with
      image           BYTES [1]  the bytes of a PNG or JPEG file
      prompt          BYTES [1]  the question, UTF-8
      max_new_tokens  INT32 [1]  optional (default --max-new-tokens)
    and get text (BYTES), tokens (INT64, up to EOS), kept_tokens (INT32: the visual tokens the
    LLM received, then those left after each LLM stage) and prefix_cache_hit (BOOL).
    'visiondrop_stream' (gRPC streaming; decoupled) takes the same inputs and sends one
    response per token as it is produced: that token and the text it adds.

    Triton's dynamic batcher groups concurrent requests: their new images are encoded in one
    batch (an image in the prefix cache skips the vision encoder and its prefill), their
    questions prefilled and decoded together. A malformed request gets a Triton error of its
    own. visiondrop_stats returns the prefix cache's counters. SIGTERM or Ctrl-C stops cleanly.
    """
    import dataclasses
    import tempfile

    from visiondrop_edge.runtime.serve import MODEL, ServeOptions, VisionDropServer, check_ports

    check_serving(max_new_tokens, max_new_tokens_limit)
    check_outputs(log_file=log_file)
    options = ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
                           batch_delay_us=batch_delay_us, max_new_tokens=max_new_tokens, max_new_tokens_limit=max_new_tokens_limit,
                           prefix_cache_bytes=prefix_cache_bytes)
    check_ports(options)
    backend, processor, source, limit = open_backend(backend_name, model, artifacts, engines, provider, budget, schedule, device,
                                                     scope=anyres_llm_stages)
    if backend.spec.schedule.grid is not None:
        raise UserError("serve runs one-view models (LLaVA-1.5) for now: its batches would mix LLaVA-NeXT's crop grids. "
                        "Run a LLaVA-NeXT model with `python cli.py generate`")
    if log_file is None:
        handle, name = tempfile.mkstemp(prefix="visiondrop-triton-", suffix=".log")
        os.close(handle)
        log_file = Path(name)
    options = dataclasses.replace(options, log_file=log_file)
    progress(f"starting Triton Inference Server ({backend.name}, schedule {backend.spec.schedule.describe()}; Triton's log: {log_file}) ...")
    server = VisionDropServer(backend, processor, source, limit, options)
    urls = server.urls
    server.serve(on_ready=lambda: click.echo(f"serving '{MODEL}' on HTTP {urls['http']}, gRPC {urls['grpc']}, "
                                             f"metrics {urls['metrics']}; SIGTERM or Ctrl-C stops", err=True))
    report = server.stats.report()
    cache, counts = report["prefix_cache"], report["server"]
    click.echo(f"stopped: {counts['requests']} answered in {counts['batches']} batches (largest {counts['largest_batch']}), "
               f"{counts['streams']} streamed, {counts['refused']} refused; prefix cache {cache['hits']} hits, {cache['misses']} misses, "
               f"{cache['evictions']} evictions", err=True)


@cli.command("triton-repo")
@click.option("--engines", type=click.Path(path_type=Path), default=None, help="TensorRT engine folder written by `build` (units: tensorrt_plan models).")
@click.option("--artifacts", type=click.Path(path_type=Path), default=None, help="Artifact folder written by `export` (units: ONNX graphs); with --engines, the folder they were built from if it moved.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The model repository folder to write.")
@click.option("--units", default="auto", show_default=True, type=click.Choice(["auto", "tensorrt", "onnxruntime", "python"]),
              help="How Triton runs each unit: auto = tensorrt for --engines, onnxruntime (Triton's ONNX Runtime backend) for --artifacts; "
                   "python = ONNX Runtime inside the Python backend, for a Triton without the ONNX Runtime backend (e.g. PyTriton's).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64), help="Instances of the BLS model (each keeps its own prefix cache).")
@serving_options
@click.option("--force", is_flag=True, help="Replace --out if it is a repository this tool wrote.")
@user_errors
def triton_repo(engines, artifacts, out, units, instances, max_batch, batch_delay_us, max_new_tokens, max_new_tokens_limit,
                prefix_cache_bytes, force) -> None:
    """Write a Triton model repository: the scale-out path (many GPUs or Jetsons behind Triton).

    \b
    REPO/visiondrop    the model clients call (the inputs and outputs of `serve`): a Python-backend
                       (BLS) model with dynamic batching, the prefix cache and per-request errors,
                       which calls every unit as a Triton model
    REPO/<unit>        vision_encoder, qkv_0, prune_s, decoder_g: config.pbtxt and the engine or graph
    Serve it with: tritonserver --model-repository REPO (visiondrop-edge installed in the
    Python that Triton's Python backend runs).
    """
    from visiondrop_edge.runtime.serve import ServeOptions
    from visiondrop_edge.runtime.triton_repo import RepoOptions, open_source, write_repository

    check_serving(max_new_tokens, max_new_tokens_limit)
    source = open_source(artifacts, engines)
    chosen = units if units != "auto" else ("tensorrt" if engines is not None else "onnxruntime")
    serving = ServeOptions(max_batch=max_batch, batch_delay_us=batch_delay_us, max_new_tokens=max_new_tokens,
                           max_new_tokens_limit=max_new_tokens_limit, prefix_cache_bytes=prefix_cache_bytes)
    path = write_repository(source, out, RepoOptions(units=chosen, instances=instances, serve=serving), force=force, progress=progress)
    click.echo(f"wrote {path} ({chosen} units); serve it with: tritonserver --model-repository {path}")


def bench_questions(loaded, config, counts: list[int], json_path: Path | str | None) -> None:
    """``bench --questions-per-image``: prefix reuse against a full prefill per question, per budget."""
    import tempfile

    from visiondrop_edge.bench.questions import run_questions_bench
    from visiondrop_edge.bench.run import pipeline_backend

    if loaded.crop_layout is not None:
        raise UserError("--questions-per-image measures one-view models (LLaVA-1.5) for now: its prefix cache does not bind "
                        "LLaVA-NeXT's crop grids. Bench a LLaVA-NeXT model without it")
    report, rows = {"model": loaded.source, "backend": config.backend, "budgets": []}, []
    with tempfile.TemporaryDirectory(prefix="visiondrop-bench-") as scratch:
        for budget in config.budgets or (*loaded.family.paper_budgets, "full"):
            schedule = loaded.schedule(budget)
            backend = pipeline_backend(loaded, schedule, Path(scratch), config)
            results = run_questions_bench(backend, loaded.processor, tuple(counts), config.new_tokens, config.repeats,
                                          config.warmup, progress=progress)
            report["budgets"].append({"budget": budget, "schedule": schedule.describe(), "rows": results})
            rows += [[budget, r["questions_per_image"], f"{r['full_ms_per_answer']['median']:.0f}",
                      f"{r['reuse_ms_per_answer']['median']:.0f}", f"{r['reuse_answer_only_ms_per_answer']['median']:.0f}",
                      f"{r['speedup']:.2f}x ({r['speedup_best']:.2f}x)"] for r in results]
    if shows_table(json_path):
        print_table(["budget", "questions", "full prefill ms/answer", "reuse ms/answer", "answer-only ms/answer",
                     "speed-up (best)"], rows)
    write_report(json_path, report)


def bench_compare(compare: str, config, json_path: Path | str | None) -> None:
    """``bench --artifacts-compare BASELINE,CANDIDATE``: ratios baseline / candidate, per batch size."""
    from visiondrop_edge.bench.compare import run_compare

    folders = [Path(p.strip()) for p in compare.split(",") if p.strip()]
    if len(folders) != 2:
        raise UserError(f"--artifacts-compare takes two folders separated by a comma, e.g. artifacts/tiny-64,artifacts/tiny-64-int8 (got '{compare}')")
    report = run_compare(folders[0], folders[1], config, progress=progress)
    rows = [[s["batch"], f"{s['prefill_speedup']:.2f}x ({s['prefill_speedup_best']:.2f}x)", f"{s['ttft_speedup']:.2f}x ({s['ttft_speedup_best']:.2f}x)",
             f"{s['decode_speedup']:.2f}x ({s['decode_speedup_best']:.2f}x)",
             f"{s['vision_speedup']:.2f}x", f"{s['peak_memory_delta_ratio']:.2f}", f"{s['disk_ratio']:.2f}"]
            for s in report["summary"]]
    if shows_table(json_path):
        print_table(["batch", "prefill speed-up (best)", "TTFT speed-up (best)", "decode speed-up (best)", "vision speed-up",
                     "peak memory (request)", "bytes on disk"], rows)
        click.echo(f"speed-up = baseline / candidate time (median of {config.repeats}, best-of-{config.repeats} in brackets); "
                   "memory and disk = candidate / baseline")
    write_report(json_path, report)


def bench_engines(engine_dirs: list[Path], config, json_path: Path | str | None) -> None:
    """``bench --backend trt --engines DIR ...``: each engine folder's pipeline, per batch size."""
    from visiondrop_edge.bench.run import run_engines

    report = run_engines(engine_dirs, config, progress=progress)
    rows = [[r["engines"], r["budget"], r["batch"], f"{r['vision_ms']['median']:.2f}", f"{r['prefill_ms']['median']:.2f}",
             f"{r['ttft_ms']['median']:.2f}", f"{r['decode_ms_per_token']['median']:.2f}", f"{r['tokens_per_s']:.1f}",
             f"{r['prefill_speedup']:.2f}x" if r.get("prefill_speedup") else "-",
             f"{r['decode_speedup']:.2f}x" if r.get("decode_speedup") else "-"] for r in report["results"]]
    if shows_table(json_path):
        print_table(["engines", "schedule", "batch", "vision ms", "prefill ms", "TTFT ms", "decode ms/token", "tokens/s",
                     "prefill vs full", "decode vs full"], rows)
    write_report(json_path, report)


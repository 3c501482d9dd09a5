#!/usr/bin/env python3
"""VisionDrop Edge: fixed-budget visual-token pruning for LLaVA, from checkpoint to deployable graphs."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from visiondrop.errors import UserError  # noqa: E402

MODEL_HELP = "Built-in preset (tiny, small, llava-1.5-7b-shape) or a local Hugging Face LLaVA checkpoint folder."
BUDGET_HELP = "Average visual tokens per LLM layer (e.g. 32, 64, 128, 192), or 'full' for no pruning. Default 128."
SCHEDULE_HELP = "Explicit schedule instead of --budget, e.g. '42+6,8:30+5,16:22+4,24:16+3' (vision k+c, then layer:k+c)."


def quiet_libraries() -> None:
    """Silence library progress bars and warnings that say nothing to a CLI user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def user_errors(command):
    """Print a :class:`UserError` as one line on stderr and exit 2, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def progress(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """VisionDrop Edge: prune LLaVA's visual tokens to a fixed budget and deploy it.

    \b
    Quick start on the built-in model:
      python cli.py generate --model tiny --image cat.png --prompt "What is this?" --budget 64
    """
    quiet_libraries()


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write the checkpoint to.")
@click.option("--force", is_flag=True, help="Replace --out if it is not empty.")
@user_errors
def tiny(out: Path, force: bool) -> None:
    """Write the built-in tiny LLaVA-1.5 (seeded random weights) as a Hugging Face checkpoint.

    The folder loads with LlavaForConditionalGeneration.from_pretrained and AutoProcessor,
    like any downloaded checkpoint; '--model tiny' uses a cached copy of it.
    """
    from visiondrop.loading import save_builtin

    path = save_builtin("tiny", out, force=force)
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--image", "images", multiple=True, required=True, type=click.Path(path_type=Path), help="Image file; repeat for a batch.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Question; one for all images or one per image.")
@click.option("--budget", default=None, help=BUDGET_HELP)
@click.option("--schedule", default=None, help=SCHEDULE_HELP)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--device", default="cpu", show_default=True, help="Torch device for the PyTorch backend (cpu, cuda).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the pruning trace (schedule, kept/target indices, top-20 first logits, ids) as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the answers.")
@user_errors
def generate(model, images, prompts, budget, schedule, max_new_tokens, device, trace_path, as_json) -> None:
    """Answer a question about an image with VisionDrop pruning (greedy decoding)."""
    import torch

    from runtime.generate import greedy_generate
    from runtime.torch_backend import TorchBackend, pad_token_id
    from visiondrop.loading import load_model
    from visiondrop.prompt import build_prompts, load_images, pixel_values
    from visiondrop.schedule import resolve_schedule
    from visiondrop.trace import stage_records, top_logits, write_json

    if len(prompts) not in (1, len(images)):
        raise UserError(f"got {len(prompts)} prompts for {len(images)} images: give one prompt, or one per image")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU: use --device cpu")
    pil_images = load_images(images)
    progress(f"loading {model} ...")
    loaded = load_model(model, device=device)
    text = loaded.config.text_config
    num_patches = (loaded.config.vision_config.image_size // loaded.config.vision_config.patch_size) ** 2
    plan = resolve_schedule(budget, schedule, text.num_hidden_layers, num_patches)
    backend = TorchBackend(loaded, plan)
    batch = build_prompts(
        loaded.tokenizer, list(prompts) * (len(images) // len(prompts)), plan.image_tokens,
        loaded.config.image_token_id, pad_token_id(loaded.tokenizer),
    )
    pixels = pixel_values(loaded.processor.image_processor, pil_images)
    progress(f"generating with schedule {plan.describe()} (average {plan.average_tokens():g} visual tokens per layer)")
    result = greedy_generate(backend, pixels, batch, max_new_tokens)
    answers = loaded.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
    if trace_path is not None:
        write_json(trace_path, {
            "model": loaded.source,
            "backend": backend.name,
            "schedule": plan.to_dict(),
            "prompts": list(prompts),
            "images": [str(p) for p in images],
            "stages": stage_records(plan, result.vision.stage, result.stages),
            "first_logits_top20": top_logits(result.first_logits),
            "generated_ids": result.tokens.tolist(),
        })
        progress(f"wrote trace {trace_path}")
    if as_json:
        click.echo(json.dumps({
            "answers": answers, "generated_ids": result.tokens.tolist(), "schedule": plan.describe(),
            "average_tokens_per_layer": plan.average_tokens(), "backend": backend.name,
        }))
    else:
        for answer in answers:
            click.echo(answer)


if __name__ == "__main__":
    cli()

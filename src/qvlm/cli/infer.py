"""`qvlm caption` and `qvlm ask`: generate text for image files with a stage-2 run.

Images are decoded one by one (a bad file gives a per-image error, the others still run), then the
good ones are generated for in batches. Decoding follows the run's `generation` config (greedy in every
preset but `paper`, which samples as the article does); the flags override it, `--greedy` turns sampling off.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvlm.errors import QVLMError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "caption", help="caption images with a stage-2 run",
        description="Caption image files (folders are expanded to their images). Prints `path: text`, or "
        "with --json one JSON object per image: {image, text, seconds} or {image, error}. Exit code 1 if "
        "any image failed.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--prompt", help="the instruction given with each image (default: the training caption "
                   "prompt, 'Describe this image.')")
    add_model_args(p)
    add_generation_args(p, max_new_tokens=32)
    p.set_defaults(func=run_caption)

    p = subparsers.add_parser(
        "ask", help="ask a question about image(s) with a stage-2 run",
        description="Answer a question about each image (folders are expanded). Output as `qvlm caption`.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("question")
    add_model_args(p)
    add_generation_args(p, max_new_tokens=16)
    p.set_defaults(func=run_ask)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default 8)")


# flag (argparse dest) -> generation keyword and `generation` config field
GENERATION_FLAGS = {"max_new_tokens": "max_new_tokens", "beams": "num_beams", "temperature": "temperature",
                    "top_p": "top_p", "repetition_penalty": "repetition_penalty"}


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation (default: the run's `generation` config; greedy in every preset "
                             "but paper)")
    g.add_argument("--max-new-tokens", type=int, help="default: the run's generation.max_new_tokens, "
                   f"else {max_new_tokens}")
    g.add_argument("--beams", type=int, help="beam search with N beams (generation.num_beams)")
    g.add_argument("--temperature", type=float, help="> 0 samples, 0 is greedy (generation.temperature)")
    g.add_argument("--top-p", type=float, help="nucleus sampling, with a temperature > 0 (generation.top_p)")
    g.add_argument("--repetition-penalty", type=float, help="generation.repetition_penalty")
    g.add_argument("--greedy", action="store_true", help="greedy decoding, whatever the run's config says")
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(default_max_new_tokens=max_new_tokens)


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags given on the command line (validated) as generation keywords; checked before
    any model loads. `with_run_defaults` fills in the rest from the run's config."""
    given = {kw: getattr(args, flag) for flag, kw in GENERATION_FLAGS.items() if getattr(args, flag) is not None}
    if args.greedy:
        given["temperature"] = 0.0
    _check_generation(given, "--")
    return given


def with_run_defaults(flags: dict[str, Any], generation, max_new_tokens: int) -> dict[str, Any]:
    """The run's `generation` config section (`max_new_tokens`, the command's own default, where it
    sets none), overridden by the flags given."""
    gen = {kw: getattr(generation, kw) for kw in GENERATION_FLAGS.values()}
    gen["max_new_tokens"] = gen["max_new_tokens"] or max_new_tokens
    _check_generation(gen, "generation.")
    return gen | flags


def _check_generation(gen: dict[str, Any], prefix: str) -> None:
    name = {kw: prefix + (flag.replace("_", "-") if prefix == "--" else kw) for flag, kw in GENERATION_FLAGS.items()}
    for kw in ("max_new_tokens", "num_beams"):
        if gen.get(kw, 1) < 1:
            raise QVLMError(f"{name[kw]} must be at least 1")
    if gen.get("temperature", 0) < 0 or not 0 < gen.get("top_p", 1) <= 1:
        raise QVLMError(f"{name['temperature']} must be >= 0 and {name['top_p']} in (0, 1]")


def load_model(run: str, device: str | None = None, need_lm: bool = False, command: str = ""):
    """Load a run's model; with `need_lm`, a stage-1 model is a one-line user error."""
    import torch

    from qvlm.models.vlm import QVLM
    from qvlm.utils import check_device

    device = check_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    model = QVLM.from_pretrained(run, device=device)
    if need_lm and model.stage != 2:
        raise QVLMError(f"{run} is a stage-1 model (Q-Former only); `qvlm {command}` needs a stage-2 run "
                        "(`qvlm train stage2 --init RUN ...`); `qvlm search` works with stage 1")
    return model


@dataclass
class Item:
    """One input image's outcome; exactly one of `text` and `error` ends up set."""

    image: str
    text: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "text": self.text, "seconds": round(self.seconds, 4)}

    def line(self) -> str:
        return f"{self.image}: error: {self.error}" if self.error is not None else f"{self.image}: {self.text}"


def generate_for_files(model, paths: list[Path], prompt: str, batch_size: int, gen: dict[str, Any],
                       emit=None) -> list[Item]:
    """Generate for each file in order, `batch_size` images per batch; `emit(item)` as each batch ends.

    `seconds` is the item's decode time plus its share of its batch's encode + generate time.
    """
    from qvlm.data.images import BadSample, load_image

    items: list[Item] = []
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = [Item(str(p)) for p in paths[start:start + batch_size]]
        good, images = [], []
        for item in chunk:
            t0 = time.perf_counter()
            try:
                images.append(load_image(item.image))
                good.append(item)
            except BadSample as e:
                item.error = f"cannot read image ({e})"
            item.seconds = time.perf_counter() - t0
        if good:
            t0 = time.perf_counter()
            texts = model.answer(images, [prompt] * len(images), **gen)
            share = (time.perf_counter() - t0) / len(good)
            for item, text in zip(good, texts, strict=True):
                item.text, item.seconds = text, item.seconds + share
        for item in chunk:
            if emit is not None:
                emit(item)
        items.extend(chunk)
    return items


def _run(args: argparse.Namespace, prompt: str, command: str) -> int:
    from qvlm.eval.search import expand_image_paths

    flags = generation_kwargs(args)
    paths = expand_image_paths(args.images)
    model = load_model(args.run, args.device, need_lm=True, command=command)
    gen = with_run_defaults(flags, model.config.generation, args.default_max_new_tokens)

    def emit(item: Item) -> None:
        if args.json:
            print(json.dumps(item.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(item.line(), file=sys.stderr if item.error else sys.stdout, flush=True)

    items = generate_for_files(model, paths, prompt, args.batch_size, gen, emit)
    failed = sum(item.error is not None for item in items)
    if failed:
        print(f"qvlm {command}: {failed} of {len(items)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def run_caption(args: argparse.Namespace) -> int:
    from qvlm.models.processing import DEFAULT_CAPTION_PROMPT

    return _run(args, args.prompt or DEFAULT_CAPTION_PROMPT, "caption")


def run_ask(args: argparse.Namespace) -> int:
    from qvlm.data.prompts import vqa_prompt

    if not args.question.strip():
        raise QVLMError("the question is empty")
    return _run(args, vqa_prompt(args.question), "ask")

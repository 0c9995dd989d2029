"""`qvlm train stage1|stage2`: the two training stages (also under `accelerate launch`)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from qvlm.config import PRESETS, QVLMConfig, get_preset
from qvlm.console import warn
from qvlm.errors import QVLMError


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train stage 1 (Q-Former alignment) or stage 2 (generation)",
                              description="Train one stage. Multi-GPU / multi-node: prefix with "
                              "`accelerate launch --num_processes N` (same flags).")
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, help_text in (("stage1", "align the Q-Former with text (ITC [+ ITM, ITG])"),
                             ("stage2", "train adapter + LoRA (+ Q-Former) to caption and answer")):
        s = stages.add_parser(stage, help=help_text)
        s.add_argument("--preset", default="offline", help=f"{' | '.join(PRESETS)} (default: offline)")
        s.add_argument("--config", help="a config file (JSON/YAML), e.g. a run's config.json")
        s.add_argument("--data", required=True, help="training data: JSONL/CSV manifest, tar shards (brace pattern, pipe:CMD), imagefolder, "
                            "datasets folder; with --set train.stream=true also a hub dataset id")
        s.add_argument("--val", help="validation data (same formats)")
        s.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
        if stage == "stage2":
            s.add_argument("--init", help="a stage-1 run folder to start the Q-Former from (recommended)")
        s.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set stage1.epochs=3 (repeatable)")
        s.set_defaults(func=run)


def resolve_config(args) -> QVLMConfig:
    """--resume reuses the run's own config; otherwise --config or --preset, then --set overrides."""
    saved = Path(args.out) / "config.json"
    if args.resume and saved.is_file():
        config = QVLMConfig.load(saved)
    elif args.config:
        config = QVLMConfig.load(args.config)
    else:
        config = get_preset(args.preset)
    return config.override(args.overrides)


def check_data(data: str, val: str | None) -> None:
    """Fail on a wrong --data/--val at once, before the models load (which may download the bundle)."""
    from qvlm.data.images import DataError
    from qvlm.data.records import read_records

    for flag, spec in (("--data", data), ("--val", val)):
        try:
            if spec:
                read_records(spec)  # checks the path and format; reads no record yet
        except DataError as e:
            raise QVLMError(f"{flag}: {e}") from e


def run(args) -> int:
    from qvlm.train.trainer import train

    stage = 1 if args.stage == "stage1" else 2
    init = getattr(args, "init", None)
    if stage == 2 and init and not Path(init).exists():
        raise QVLMError(f"--init {init}: no such stage-1 run folder")
    if stage == 2 and not init and os.environ.get("RANK", "0") == "0":  # once under torchrun / accelerate
        warn("stage 2 without --init: the Q-Former has never been aligned with images (that is stage 1), "
             "so captions and answers will be much worse. Train stage 1 first and pass --init STAGE1_RUN, "
             "unless this is what you want.")
    check_data(args.data, args.val)
    argv = getattr(args, "argv", None)  # set by `main`; absent when a caller parsed the flags itself
    if argv is not None and os.environ.get("RANK", "0") == "0" and not (Path(args.out) / "model").exists():
        from qvlm.models.card import COMMAND_FILE

        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / COMMAND_FILE).write_text("qvlm " + shlex.join(argv) + "\n")
    model_dir = train(resolve_config(args), stage, args.data, args.out, val=args.val, init=init,
                      resume=args.resume)
    print(f"model saved to {model_dir}")
    return 0

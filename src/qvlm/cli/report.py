"""`qvlm report`: (re)write a run's report files: loss curves, similarity grid, query attention maps,
prediction gallery."""

from __future__ import annotations

import argparse
from pathlib import Path

from qvlm.cli.infer import add_generation_args, generation_kwargs, load_model, with_run_defaults
from qvlm.extras import require


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="write loss.png, similarity.png, attention.png, word_attention.png and gallery.html "
        "into RUN/report/",
        description="Write the report files of a run into RUN/report/ (or --out): loss.png from "
        "RUN/metrics.jsonl; with --data, similarity.png (Q-Former similarity of up to 8 test images with "
        "their first captions), attention.png (where each query looks in the first 4 test images: its "
        "cross-attention over the patches, averaged over heads and layers) and, for stage-2 runs, "
        "word_attention.png (which queries each generated word of the first 4 answers drew on) and "
        "gallery.html (generated captions or answers beside the references for up to 24 test samples). "
        "Prints the paths.")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="test set for the similarity grid, the attention maps and the gallery")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/report)")
    p.add_argument("--n-grid", type=int, default=8, help="images in the similarity grid (default 8)")
    p.add_argument("--n-gallery", type=int, default=24, help="samples in the gallery (default 24)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_generation_args(p, max_new_tokens=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from qvlm.errors import QVLMError
    from qvlm.eval.evaluate import load_records, write_report

    flags = generation_kwargs(args)
    require("matplotlib", "qvlm report")  # before loading the model
    run_dir = Path(args.run)
    records = load_records(args.data)[0] if args.data else []
    model = load_model(args.run, args.device)
    gen = with_run_defaults(flags, model.config.generation, args.default_max_new_tokens)
    paths = write_report(model, run_dir, records, out_dir=args.out, n_grid=args.n_grid,
                         n_gallery=args.n_gallery, batch_size=args.batch_size, **gen)
    if not paths:
        raise QVLMError(f"nothing to report: {run_dir} has no metrics.jsonl and no --data was given")
    if args.json:
        print(json.dumps({name: str(path) for name, path in paths.items()}))
    else:
        for name, path in paths.items():
            print(f"{name:<10} {path}")
    return 0

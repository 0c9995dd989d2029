"""`qvlm eval`: retrieval / caption / VQA metrics of a run on a test set, as a table and a JSON file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from qvlm.cli.infer import add_generation_args, generation_kwargs, load_model, with_run_defaults
from qvlm.extras import require

TASKS = ("retrieval", "caption", "vqa")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a run: retrieval R@K, caption BLEU-4/ROUGE-L/CIDEr, VQA accuracy",
        description="Evaluate a run on a test set (see docs/metrics.md for the definitions). Prints a table "
        "and writes a JSON file with the metrics (and per-sample predictions for caption / vqa). Bad images "
        "are skipped and counted.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("--data", required=True, help="test set: JSONL manifest, CSV/TSV, tar shards, HF folder")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--json-out", type=Path, help="where to write the JSON (default: RUN/eval/TASK.json)")
    p.add_argument("--limit", type=int, help="evaluate the first N images (retrieval, caption) or questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: the one the run trained with)")
    p.add_argument("--no-cache", action="store_true", help="encode images without the feature cache")
    p.add_argument("--itm-top-k", type=int, default=16, help="retrieval: ITM re-ranks this many candidates")
    p.add_argument("--no-itm", action="store_true", help="retrieval: skip ITM re-ranking")
    p.add_argument("--match", choices=("image", "caption"), default="image",
                   help="retrieval: a caption matches its own image (default), or every image with an "
                   "equal caption (data whose captions repeat, e.g. easy-VQA)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME",
                   help="also score a simpler model on the run's frozen features, in one table with the run "
                   "(repeatable): chance, linear (retrieval); nearest, blind (caption); prior (vqa). See docs/metrics.md")
    p.add_argument("--train", help="training data for --baseline linear / nearest / prior (the run's training set, "
                   "never the test set)")
    add_generation_args(p, max_new_tokens=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qvlm.data.cache import feature_cache_folder
    from qvlm.eval.evaluate import evaluate_captions, evaluate_retrieval, evaluate_vqa, load_records

    flags = generation_kwargs(args)
    if args.task == "caption":  # the metrics come last: check before generating every caption
        require("pycocoevalcap", "qvlm eval --task caption")
    if args.baseline:
        from qvlm.eval.baselines import check_request

        check_request(args.baseline, args.task, args.train)  # before the slow part
    records, read_skips = load_records(args.data)
    model = load_model(args.run, args.device, need_lm=args.task != "retrieval", command=f"eval --task {args.task}")
    # answers are a few words: VQA's own default is 16 new tokens where the run's config sets none
    default_tokens = 16 if args.task == "vqa" else args.default_max_new_tokens
    gen = with_run_defaults(flags, model.config.generation, default_tokens)
    run_dir = run_dir_of(Path(args.run))
    cache = None if args.no_cache else (args.cache or feature_cache_folder(model.config.train.feature_cache))
    common = {"batch_size": args.batch_size, "cache": cache, "limit": args.limit}
    if args.task == "retrieval":
        result = evaluate_retrieval(model, records, itm=False if args.no_itm else None, match=args.match,
                                    itm_top_k=args.itm_top_k, **common)
    elif args.task == "caption":
        result = evaluate_captions(model, records, **common, **gen)
    else:
        result = evaluate_vqa(model, records, **common, **gen)
    result = {"task": args.task, "run": str(args.run), "data": str(args.data),
              "bad_records": sum(read_skips.skipped.values()), **result}
    if args.baseline:
        from qvlm.eval.baselines import run_baselines

        result["baselines"], result["baseline_predictions"] = run_baselines(
            model, records, args.baseline, args.task, train=args.train, match=args.match, **common, **gen)
    out = args.json_out or run_dir / "eval" / f"{args.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("predictions", "baseline_predictions")},
                         ensure_ascii=False))
    else:
        print(format_table(result))
        if args.baseline:
            from qvlm.eval.baselines import format_baseline_table

            print(format_baseline_table(result))
        print(f"wrote {out}")
    if result["skipped"] or result["bad_records"]:
        print(f"skipped: {result['skip_summary']}; malformed records: {result['bad_records']}", file=sys.stderr)
    return 0


def run_dir_of(path: Path) -> Path:
    """The run folder of RUN or RUN/model (outputs belong next to the run, not inside model/)."""
    from qvlm.models.vlm import is_model_folder

    return path.parent if path.name == "model" and is_model_folder(path) else path


def format_table(result: dict[str, Any]) -> str:
    """A small aligned table of the headline numbers (recalls and accuracies as %)."""
    task = result["task"]
    rows: list[tuple[str, str]] = []
    if task == "retrieval":
        for prefix, label in (("", "ITC"), ("itm_", f"ITM top-{result.get('itm_top_k')}")):
            if f"{prefix}i2t_r1" not in result:
                continue
            for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
                vals = "  ".join(f"R@{k} {100 * result[f'{prefix}{d}_r{k}']:5.1f}" for k in (1, 5, 10))
                rows.append((f"{label} {name}", vals))
        rows.append(("images / texts", f"{result['n_images']} / {result['n_texts']}"))
    elif task == "caption":
        rows += [("BLEU-4", f"{result['bleu4']:.4f}"), ("ROUGE-L", f"{result['rouge_l']:.4f}"),
                 ("CIDEr-D", f"{result['cider']:.4f}"),
                 ("distinct", f"{result['distinct']:.4f} (different captions / images)"),
                 ("images", str(result["n"]))]
    else:
        rows += [("exact match", f"{100 * result['exact_match']:.2f}%"),
                 ("soft accuracy", f"{100 * result['soft_accuracy']:.2f}%"), ("questions", str(result["n"]))]
        rows += [(f"  {t}", f"{100 * v['exact_match']:.2f}% of {v['n']}") for t, v in result["per_type"].items()]
    rows.append(("skipped", str(result["skipped"])))
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

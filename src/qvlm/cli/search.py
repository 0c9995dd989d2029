"""`qvlm search`: rank a folder of images by a text query with the stage-1 Q-Former."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search", help="find the images of a folder that best match a text (stage-1 retrieval)",
        description="Rank images by the Q-Former's image-text similarity to TEXT and print the top k. "
        "Patch features are cached (where the run's training cached them, by default), so later searches over the same images skip "
        "the vision encoder. Works with stage-1 and stage-2 runs.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("text", help="the query")
    # One path per --images (repeatable): a list-taking flag would swallow the query that follows it.
    p.add_argument("--images", required=True, action="append", metavar="DIR_OR_IMAGE",
                   help="a folder (searched recursively) or an image file; repeat for more")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--cache", type=Path, help="feature cache folder (default: the one the run trained with)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from qvlm.cli.infer import load_model
    from qvlm.data.cache import feature_cache_folder
    from qvlm.errors import QVLMError
    from qvlm.eval.search import expand_image_paths, search_images

    if args.top_k < 1:
        raise QVLMError("--top-k must be at least 1")
    paths = expand_image_paths(args.images)
    model = load_model(args.run, args.device)
    cache = args.cache or feature_cache_folder(model.config.train.feature_cache)
    result = search_images(model, paths, args.text, cache, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        for hit in result.hits:
            print(f"{hit.rank:>3}  {hit.score:+.4f}  {hit.image}")
        print(f"{result.n_images} images ranked, {result.encoded} newly encoded", file=sys.stderr)
    if result.skips.skipped:
        print(f"skipped: {result.skips.summary()}", file=sys.stderr)
    return 0

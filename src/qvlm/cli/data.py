"""`qvlm data ...`: build JSONL manifests from public dataset layouts and the bundled datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare datasets (manifests from COCO, Flickr30k, VQAv2, img2dataset; bundled data)",
        description="Write JSONL manifests (docs/data.md) from common dataset layouts or bundled data.")
    sub = parser.add_subparsers(dest="data_command", metavar="SOURCE", required=True)

    p = sub.add_parser("coco", help="COCO captions, Karpathy split JSON (dataset_coco.json)")
    p.add_argument("--src", required=True, help="dataset_coco.json")
    p.add_argument("--images", help="folder holding train2014/ and val2014/ (default: next to --src)")
    _out(p)

    p = sub.add_parser("flickr30k", help="Flickr30k: Karpathy dataset_flickr30k.json or results_20130124.token")
    p.add_argument("--src", required=True, help="dataset_flickr30k.json or results_20130124.token")
    p.add_argument("--images", help="folder of the .jpg files (default: flickr30k-images/ next to --src)")
    _out(p)

    p = sub.add_parser("vqav2", help="VQAv2 questions + annotations JSON")
    p.add_argument("--src", "--questions", dest="src", required=True,
                   help="v2_OpenEnded_mscoco_<split>_questions.json")
    p.add_argument("--annotations", help="v2_mscoco_<split>_annotations.json (absent for test)")
    p.add_argument("--images", help="folder of COCO_<split>_<id>.jpg (default: <split>/ next to --src)")
    p.add_argument("--split", help="e.g. train2014 (default: the questions file's data_subtype)")
    _out(p)

    p = sub.add_parser("img2dataset", aliases=["folder"],
                       help="a folder of images with same-named .txt captions (img2dataset's layout), or tar shards")
    p.add_argument("--src", required=True, help="a folder (searched recursively: photo.jpg + photo.txt), "
                   "'dir/{00000..00099}.tar' or a folder of shards")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    _out(p)

    p = sub.add_parser("easyvqa", help="easy-VQA (bundled with the easy-vqa package): 5,000 images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of TRAIN images held out")
    p.add_argument("--seed", type=int, default=0)
    _out(p)

    p = sub.add_parser("openclipart", help="openclipart (Debian openclipart-png + openclipart-svg)")
    p.add_argument("--root", default="/usr/share/openclipart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=256, help="longest image side in pixels")
    p.add_argument("--limit", type=int, help="use a random subset of this many files (quick trials)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the kept images for val")
    p.add_argument("--test-fraction", type=float, default=0.05, help="share of the kept images for test")
    _out(p)
    parser.set_defaults(func=run)


def _out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for the manifests")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args: argparse.Namespace) -> int:
    from qvlm.data import bundled, convert

    src = Path(args.src) if getattr(args, "src", None) else None
    command = args.data_command
    if command == "coco":
        counts = convert.convert_karpathy(src, args.images or src.parent, args.out)
    elif command == "flickr30k":
        counts = convert.convert_flickr30k(src, args.images or src.parent / "flickr30k-images", args.out)
    elif command == "vqav2":
        images = args.images
        if images is None:
            split = args.split or json.loads(src.read_text()).get("data_subtype", "")
            images = src.parent / split
        counts = convert.convert_vqav2(src, args.annotations, images, args.out, split=args.split)
    elif command in ("img2dataset", "folder"):
        counts = convert.convert_img2dataset(args.src, args.out, args.val_fraction, args.seed)
    elif command == "easyvqa":
        counts = bundled.build_easyvqa(args.out, seed=args.seed, val_fraction=args.val_fraction)
    else:
        counts = bundled.build_openclipart(args.out, root=args.root, seed=args.seed, max_side=args.max_side,
                                           limit=args.limit, val_fraction=args.val_fraction,
                                           test_fraction=args.test_fraction)
    _report(command, args.out, counts, args.json)
    return 0


def _report(command: str, out: str, counts: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(counts, sort_keys=True))
        return
    print(f"{command}: wrote manifests to {out}")
    for name, value in counts.items():
        if isinstance(value, dict):
            print(f"  {name}: " + ", ".join(f"{v:,} {k}" for k, v in value.items()))
        else:
            print(f"  {name}: {value:,}")

"""Converters from public dataset layouts to JSONL manifests (docs/design.md#data-formats).

Images stay where they are; manifests refer to them by paths relative to the output folder (absolute
when they live on another tree root), so a manifest and its images can move together.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from qvlm.data.images import DataError
from qvlm.data.records import IMAGE_EXTENSIONS, expand_shards, iter_shards


def write_manifest(path: Path, rows: list[dict]) -> int:
    """Write rows as JSONL via a temporary file (an interrupted run leaves no half manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)


def _rel(image: Path, out: Path) -> str:
    try:
        return os.path.relpath(image.resolve(), out.resolve())
    except ValueError:  # different drives (Windows)
        return str(image.resolve())


def _load_json(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"not found: {path}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e


# ---------------------------------------------------------------------------------------------------
# Karpathy split JSON (COCO, Flickr30k, Flickr8k)


def convert_karpathy(src: str | Path, images: str | Path, out: str | Path) -> dict[str, int]:
    """`dataset_coco.json` / `dataset_flickr30k.json` → OUT/{train,val,test}.jsonl, one record per image.

    images[]: filepath (COCO: "val2014"; absent for Flickr), filename, split ("restval" joins train),
    sentences[].raw. `images` is the folder holding `filepath/filename`.
    """
    data = _load_json(src)
    if "images" not in data:
        raise DataError(f"{src}: not a Karpathy split file (no 'images' list)")
    out, images = Path(out), Path(images)
    splits: dict[str, list[dict]] = defaultdict(list)
    for entry in data["images"]:
        split = {"restval": "train"}.get(entry.get("split", "train"), entry.get("split", "train"))
        image = images / entry.get("filepath", "") / entry["filename"]
        captions = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        if captions:
            row = {"image": _rel(image, out), "captions": captions}
            for key in ("cocoid", "imgid"):
                if key in entry:
                    row[key] = entry[key]
            splits[split].append(row)
    return {split: write_manifest(out / f"{split}.jsonl", rows) for split, rows in sorted(splits.items())}


def convert_flickr_token(src: str | Path, images: str | Path, out: str | Path) -> dict[str, int]:
    """Flickr30k `results_20130124.token` (`1000092795.jpg#0<TAB>caption`) → OUT/all.jsonl.

    This layout has no split; use the Karpathy JSON for the standard one.
    """
    out, images = Path(out), Path(images)
    captions: dict[str, list[str]] = defaultdict(list)
    with open(src, encoding="utf-8") as f:
        for line in f:
            name, sep, caption = line.rstrip("\n").partition("\t")
            if sep and caption.strip():
                captions[name.split("#")[0]].append(caption.strip())
    rows = [{"image": _rel(images / name, out), "captions": caps} for name, caps in captions.items()]
    return {"all": write_manifest(out / "all.jsonl", rows)}


def convert_flickr30k(src: str | Path, images: str | Path, out: str | Path) -> dict[str, int]:
    """Either Flickr30k layout, told apart by the file: Karpathy JSON or the .token table."""
    return convert_karpathy(src, images, out) if str(src).endswith(".json") else \
        convert_flickr_token(src, images, out)


# ---------------------------------------------------------------------------------------------------
# VQAv2


def convert_vqav2(questions: str | Path, annotations: str | Path | None, images: str | Path,
                  out: str | Path, split: str | None = None) -> dict[str, int]:
    """VQAv2 questions (+ annotations) JSON → OUT/<split>.jsonl, one record per question.

    Image file: `images/COCO_{split}_{image_id:012d}.jpg`; split from the questions file's
    `data_subtype` (e.g. "train2014") unless given. Records carry all 10 answers (for soft accuracy),
    `answer` = multiple_choice_answer, answer_type and question_id. Test questions have no annotations.
    """
    qdata = _load_json(questions)
    split = split or qdata.get("data_subtype")
    if not split:
        raise DataError(f"{questions}: no data_subtype; pass --split (e.g. train2014)")
    by_qid = {}
    if annotations is not None:
        by_qid = {a["question_id"]: a for a in _load_json(annotations).get("annotations", [])}
    out, images = Path(out), Path(images)
    rows = []
    for q in qdata.get("questions", []):
        row = {"image": _rel(images / f"COCO_{split}_{q['image_id']:012d}.jpg", out),
               "question": q["question"], "question_id": q["question_id"]}
        ann = by_qid.get(q["question_id"])
        if ann is not None:
            row["answers"] = [a["answer"] for a in ann.get("answers", [])]
            row["answer"] = ann.get("multiple_choice_answer")
            row["answer_type"] = ann.get("answer_type")
        elif annotations is not None:
            continue  # a question without its annotation: nothing to train or score on
        rows.append(row)
    return {split: write_manifest(out / f"{split}.jsonl", rows)}


# ---------------------------------------------------------------------------------------------------
# img2dataset (Conceptual Captions and friends)


def convert_img2dataset(src: str | Path, out: str | Path, val_fraction: float = 0.1,
                        seed: int = 0) -> dict[str, int]:
    """img2dataset output → OUT/train.jsonl + OUT/val.jsonl (seeded split; the article's 90/10).

    The folder layout (`00000/000000001.jpg` + `.txt`/`.json`) is referenced in place; tar shards are
    unpacked into OUT/images/ first (or train straight from the shards: `--data 'dir/{00000..00099}.tar'`).
    """
    out = Path(out)
    src_str = str(src)
    if os.path.isdir(src_str) and not any(Path(src_str).glob("*.tar")):
        rows = _img2dataset_folder(Path(src_str), out)
    else:
        rows = _img2dataset_shards(src_str, out)
    if not rows:
        raise DataError(f"no image/caption pairs found in {src}")
    random.Random(seed).shuffle(rows)
    n_val = round(val_fraction * len(rows))
    return {"train": write_manifest(out / "train.jsonl", rows[n_val:]),
            "val": write_manifest(out / "val.jsonl", rows[:n_val])}


def _img2dataset_folder(src: Path, out: Path) -> list[dict]:
    rows = []
    for image in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption = _sidecar_caption(image)
        if caption:
            rows.append({"image": _rel(image, out), "caption": caption})
    return rows


def _sidecar_caption(image: Path) -> str | None:
    txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8", errors="replace").strip() or None
    if meta.exists():
        try:
            caption = json.loads(meta.read_text(encoding="utf-8")).get("caption")
        except (json.JSONDecodeError, AttributeError):
            return None
        return caption.strip() if isinstance(caption, str) and caption.strip() else None
    return None


def _img2dataset_shards(spec: str, out: Path) -> list[dict]:
    rows = []
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for record in iter_shards(expand_shards(spec)):
        name = re.sub(r"[^\w.-]", "_", record.key.replace(".tar/", "_")) + _sniff_ext(record.image_bytes)
        (image_dir / name).write_bytes(record.image_bytes)
        if record.captions:
            rows.append({"image": f"images/{name}", "caption": record.captions[0].strip()})
    return rows


def _sniff_ext(data: bytes | None) -> str:
    if data and data.startswith(b"\x89PNG"):
        return ".png"
    if data and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".jpg"

"""Datasets that need no download: easy-VQA (PyPI `easy-vqa`) and openclipart (Debian packages).

Both are written as JSONL manifests (docs/design.md#data-formats) with the images copied next to them.
"""

from __future__ import annotations

import html
import json
import random
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from qvlm.data.images import BadSample, DataError, load_image
from qvlm.extras import missing_extra

EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
EASYVQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


# ---------------------------------------------------------------------------------------------------
# easy-VQA


def easyvqa_data_dir() -> Path:
    try:
        import easy_vqa
    except ImportError as e:
        raise missing_extra(e, "easy-VQA", extra="demo") from e
    return Path(easy_vqa.__file__).parent / "data"


def easyvqa_answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASYVQA_SHAPES else "color"


def infer_colour_and_shape(questions: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """An image's colour and shape from its (question, answer) pairs.

    Every word of a "what ..." question and its answer describe the image ("what color is the circle?"
    → blue: a blue circle). A yes/no question asserts its colour/shape word, or denies it when it says
    "not"/"no" (XOR the answer). Where nothing asserts a value, the one value never denied is taken.
    """
    present: set[str] = set()
    absent: set[str] = set()
    vocab = set(EASYVQA_SHAPES) | set(EASYVQA_COLORS)
    for question, answer in questions:
        words = re.findall(r"[a-z]+", question.lower())
        mentioned = {w for w in words if w in vocab}
        if answer in ("yes", "no"):
            asserted = (answer == "yes") != bool({"not", "no"} & set(words))
            (present if asserted else absent).update(mentioned)
        else:
            present.update(mentioned | {answer})
    return _pick(present, absent, EASYVQA_COLORS), _pick(present, absent, EASYVQA_SHAPES)


def _pick(present: set[str], absent: set[str], values: tuple[str, ...]) -> str | None:
    found = [v for v in values if v in present]
    if len(found) == 1:
        return found[0]
    remaining = [v for v in values if v not in absent]
    return remaining[0] if not found and len(remaining) == 1 else None


# easy-VQA draws each shape in one flat CSS colour on a light background (checked on every image whose
# questions give its colour: the shape's most common pixel is exactly this colour).
_EASYVQA_RGB = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (0, 0, 0): "black",
                (128, 128, 128): "gray", (0, 128, 128): "teal", (165, 42, 42): "brown", (255, 255, 0): "yellow"}


def colour_and_shape_from_pixels(path: Path) -> tuple[str | None, str | None]:
    """Fallback for the ~10% of images whose questions leave colour or shape open.

    Colour: the second most common pixel (after the background) looked up in the palette. Shape: how
    much of its bounding box the shape fills — rectangle ≈ 1, circle ≈ π/4, triangle ≈ 1/2 (measured
    ranges over labelled images: ≥ 0.97, 0.74–0.91, 0.50–0.63).
    """
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    values, freq = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    order = np.argsort(-freq)
    if len(order) < 2:
        return None, None
    background, fill = values[order[0]], values[order[1]]
    mask = np.abs(pixels - fill).sum(-1) < np.abs(pixels - background).sum(-1)
    ys, xs = np.nonzero(mask)
    fullness = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fullness > 0.95 else "triangle" if fullness < 0.68 else "circle"
    return _EASYVQA_RGB.get(tuple(int(v) for v in fill)), shape


def easyvqa_caption(colour: str | None, shape: str | None) -> str:
    """ "a blue circle"; where the questions leave one unknown, "a blue shape" / "a circle"."""
    if colour and shape:
        return f"a {colour} {shape}"
    return f"a {colour} shape" if colour else f"a {shape}" if shape else "a shape"


def build_easyvqa(out: str | Path, seed: int = 0, val_fraction: float = 0.1) -> dict[str, dict[str, int]]:
    """Copy easy-VQA's images to OUT/images/{train,test}/ and write train/val/test.jsonl.

    The official train/test split is kept; validation is a seeded `val_fraction` of the TRAIN images
    with all their questions. Each image gets one caption record before its question records.
    Returns {split: {"images": n, "questions": n, "captions": n}}.
    """
    src = easyvqa_data_dir()
    out = Path(out)
    splits: dict[str, list[dict]] = {}
    counts: dict[str, dict[str, int]] = {}
    for official in ("train", "test"):
        by_image = _easyvqa_questions(src / official / "questions.json")
        image_dir = out / "images" / official
        image_dir.mkdir(parents=True, exist_ok=True)
        ids = sorted(by_image)
        held_out: set[int] = set()
        if official == "train":
            held_out = set(random.Random(seed).sample(ids, round(val_fraction * len(ids))))
        for image_id in ids:
            name = f"{image_id}.png"
            shutil.copyfile(src / official / "images" / name, image_dir / name)
            split = "val" if image_id in held_out else official
            rows = splits.setdefault(split, [])
            rows.extend(_easyvqa_rows(f"images/{official}/{name}", by_image[image_id], image_dir / name))
            c = counts.setdefault(split, {"images": 0, "questions": 0, "captions": 0})
            c["images"] += 1
            c["questions"] += len(by_image[image_id])
            c["captions"] += 1
    for split, rows in splits.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    return counts


def _easyvqa_questions(path: Path) -> dict[int, list[tuple[str, str]]]:
    """{image id: [(question, answer), ...]} from the package's [[question, answer, image_id], ...]."""
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in json.loads(path.read_text()):
        by_image[int(image_id)].append((question, answer))
    return by_image


def _easyvqa_rows(image: str, questions: list[tuple[str, str]], path: Path) -> list[dict]:
    colour, shape = infer_colour_and_shape(questions)
    if colour is None or shape is None:
        seen_colour, seen_shape = colour_and_shape_from_pixels(path)
        colour, shape = colour or seen_colour, shape or seen_shape
    rows = [{"image": image, "caption": easyvqa_caption(colour, shape)}]
    rows += [{"image": image, "question": q, "answer": a, "answer_type": easyvqa_answer_type(a)}
             for q, a in questions]
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# openclipart

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
OPENCLIPART_INSTALL = "sudo apt-get install openclipart-png openclipart-svg"

# Titles that name a collection, a theme or an author, not the picture.
_GENERIC_TITLE = re.compile(
    r"collection|theme|icons?\b|iconset|clip ?arts?\b|clipart by|\bsvg\b|gradient|symbol.?signs|"
    r"submission|sibmission|^r\d+\b|untitled|0x[0-9a-f]+|^drawing|^image\s*\d*$|^layer\s*\d*$|^unnamed",
    re.IGNORECASE)
_FILE_LIKE = re.compile(r"\.(svg|png|jpe?g|gif|ai|eps)$|^[\w.-]*\d{2,}[\w.-]*$|^\S+_\S+$", re.IGNORECASE)
GENERIC_TITLE_MIN_REPEATS = 10  # a title on ≥ this many files is a collection name ("gramastar": 1,375)


def read_svg_text(svg: Path) -> tuple[str, str]:
    """(title, description) of the work: the first <dc:title>/<dc:description> in the metadata."""
    text = svg.read_text(encoding="utf-8", errors="replace")[:50_000]
    work = re.search(r"<cc:Work\b.*?</cc:Work>", text, re.S)
    scope = work.group(0) if work else text
    title = re.search(r"<dc:title>(.*?)</dc:title>", scope, re.S)
    desc = re.search(r"<dc:description>(.*?)</dc:description>", scope, re.S)
    return _unxml(title.group(1)) if title else "", _unxml(desc.group(1)) if desc else ""


def _unxml(text: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def clean_clipart_title(title: str, repeats: int = 1) -> str | None:
    """A caption from a clip-art title, or None when the title does not describe the picture."""
    if not title or repeats >= GENERIC_TITLE_MIN_REPEATS or _GENERIC_TITLE.search(title):
        return None
    if _FILE_LIKE.search(title.strip()):
        return None
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", title)  # camelCase → camel Case
    text = re.sub(r"[_\-–—]+", " ", text)
    text = re.sub(r"(?<=[A-Za-z])\d+\b|\b\d+$", "", text)  # "Aircraft3", "clock 01": numbering, not content
    text = re.sub(r"[^\w\s',&()!?.]", " ", text)
    text = " ".join(text.lower().split()).strip(" .,")
    if len(re.findall(r"[a-z]", text)) < 3 or "@" in text or "http" in text:
        return None
    return text


def clean_clipart_description(desc: str) -> str | None:
    """A short, plain description can stand in for a generic title; long or URL-ish ones cannot."""
    text = " ".join(desc.split())
    if not text or len(text) > 100 or "@" in text or "http" in text or "converted" in text.lower():
        return None
    return clean_clipart_title(text)


def build_openclipart(out: str | Path, root: str | Path = OPENCLIPART_ROOT, seed: int = 0,
                      val_fraction: float = 0.05, test_fraction: float = 0.05, max_side: int = 256,
                      limit: int | None = None) -> dict[str, int]:
    """Write OUT/images/*.png (RGBA composited on white, at most `max_side` px) and
    train/val/test.jsonl (a seeded split: these shares of the kept images held out, the rest train).

    Returns counts: found, kept, generic/dup/bad-image drops and per-split sizes.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise DataError(f"val and test fractions must be >= 0 and leave images to train on; got {val_fraction} "
                        f"and {test_fraction}")
    root = Path(root)
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise DataError(f"openclipart not found under {root}; install it with: {OPENCLIPART_INSTALL}")
    svgs = sorted((root / "svg").rglob("*.svg"))
    if limit:
        svgs = random.Random(seed).sample(svgs, min(limit, len(svgs)))
    texts = {svg: read_svg_text(svg) for svg in svgs}
    title_counts = Counter(t.lower() for t, _ in texts.values())
    counts = Counter(found=len(svgs))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, seen = [], set()
    for svg in svgs:
        title, desc = texts[svg]
        caption = clean_clipart_title(title, title_counts[title.lower()]) or clean_clipart_description(desc)
        png = root / "png" / svg.relative_to(root / "svg").with_suffix(".png")
        if caption is None:
            counts["generic_title"] += 1
        elif caption in seen:
            counts["duplicate_caption"] += 1
        elif not png.exists():
            counts["missing_png"] += 1
        else:
            name = "_".join(svg.relative_to(root / "svg").with_suffix(".png").parts)
            try:
                _save_thumbnail(png, out / "images" / name, max_side)
            except BadSample as e:
                counts[f"bad_image_{e.reason}"] += 1
                continue
            seen.add(caption)
            rows.append({"image": f"images/{name}", "caption": caption, "source": str(svg.relative_to(root))})
    random.Random(seed).shuffle(rows)
    n_train, n_val = int((1 - val_fraction - test_fraction) * len(rows)), int(val_fraction * len(rows))
    parts = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    for split, part in parts.items():
        _write_jsonl(out / f"{split}.jsonl", part)
        counts[split] = len(part)
    counts["kept"] = len(rows)
    return dict(counts)


def _save_thumbnail(src: Path, dst: Path, max_side: int) -> None:
    image = load_image(src)  # composites transparency on white
    image.thumbnail((max_side, max_side))
    image.save(dst, format="PNG", optimize=False)

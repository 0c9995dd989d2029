"""Dataset records and the readers that produce them (docs/design.md#data-formats).

`read_records(spec)` accepts:
- a JSONL manifest (`*.jsonl`): `image` plus `caption` | `captions` | `question` + `answer`/`answers`,
  optional `answer_type`; image paths relative to the manifest's folder;
- a CSV/TSV table (`*.csv`, `*.tsv`) with the same columns (`captions`/`answers` as a JSON list or
  `|`-separated);
- WebDataset tar shards as img2dataset writes them (`dir/{00000..00099}.tar`, a single `.tar`, a glob,
  a folder of `.tar` files, or `pipe:COMMAND` writing a tar to stdout, braces expanded as in webdataset):
  `<key>.jpg` + `<key>.txt` and/or `<key>.json` with "caption";
- a Hugging Face `datasets` folder (`save_to_disk` output) with an image column;
- an `imagefolder` folder (the Hugging Face convention): images plus `metadata.jsonl` or `metadata.csv`
  naming each image in `file_name`.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import glob
import hashlib
import json
import os
import re
import subprocess
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvlm.data.images import DEFAULT_MAX_PIXELS, BadSample, DataError, SkipCounter, load_image
from qvlm.extras import missing_extra

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KNOWN_FIELDS = ("image", "image_path", "file_name", "caption", "captions", "question", "answer", "answers",
                "answer_type")


@dataclass
class Record:
    """One sample: an image with its captions and/or one question about it.

    Exactly one of `image_path` (absolute) and `image_bytes` (tar members, HF datasets) is set.
    """

    key: str  # stable id: "<manifest>:<line>", "<shard>/<member key>", "<dataset>:<row>"
    image_path: str | None = None
    image_bytes: bytes | None = None
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra manifest fields (question_id, split, ...)
    _hash: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_vqa(self) -> bool:
        return self.question is not None

    @property
    def image_source(self) -> str | bytes:
        return self.image_bytes if self.image_bytes is not None else (self.image_path or "")

    def open_image(self, max_pixels: int | None = None):
        """Decode the image to RGB (`PIL.Image`), or raise `BadSample`."""
        return load_image(self.image_source, max_pixels or DEFAULT_MAX_PIXELS)

    def read_image_bytes(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        try:
            return Path(self.image_path or "").read_bytes()
        except FileNotFoundError as e:
            raise BadSample("missing", str(self.image_path)) from e
        except OSError as e:
            raise BadSample("unreadable", f"{self.image_path}: {e}") from e

    def content_hash(self) -> str:
        """sha256 of the encoded image bytes: the image's identity in the feature cache."""
        if self._hash is None:
            self._hash = hashlib.sha256(self.read_image_bytes()).hexdigest()
        return self._hash

    def best_answer(self) -> str | None:
        """The most common answer (ties: the first given), as VQAv2's multiple_choice_answer."""
        if not self.answers:
            return None
        counts = Counter(self.answers)
        return max(self.answers, key=lambda a: (counts[a], -self.answers.index(a)))


# ---------------------------------------------------------------------------------------------------
# Dispatch


def read_records(spec: str | Path, skips: SkipCounter | None = None) -> Iterator[Record]:
    """Yield the records of a manifest, table, shard set or HF dataset folder (see module doc).

    Malformed rows are skipped and counted in `skips` (reason "bad_record"); an unreadable or
    unrecognised `spec` raises `DataError`.
    """
    spec = str(spec)
    path = Path(spec)
    if _looks_like_shards(spec):
        return iter_shards(expand_shards(spec), skips=skips)
    if not path.exists():
        hint = _HUB_ID_HINT.format(spec=spec) if _looks_like_hub_id(spec) else ""
        raise DataError(f"dataset not found: {spec}{hint}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return read_hf_dataset(path, skips=skips)
        metadata = imagefolder_metadata(path)
        if metadata is not None:
            return read_records(metadata, skips=skips)
        if any(path.glob("*.tar")):
            return iter_shards(expand_shards(spec), skips=skips)
        raise DataError(f"{spec}: a folder must be a Hugging Face datasets folder, an imagefolder (images + "
                        "metadata.jsonl or metadata.csv) or hold .tar shards")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, skips=skips)
    if suffix in (".csv", ".tsv"):
        return read_table(path, skips=skips)
    raise DataError(f"{spec}: unknown dataset format (expected .jsonl, .csv, .tsv, .tar shards or a "
                    "Hugging Face datasets folder)")


_HUB_ID_HINT = (
    ". It looks like a Hugging Face hub id: qvlm streams hub datasets only with --set train.stream=true "
    "(docs/data.md#streaming); otherwise it reads from disk: a JSONL/CSV manifest, tar shards, an imagefolder "
    "or a `datasets` save_to_disk folder. Download it once with "
    "`python -c \"import datasets; datasets.load_dataset('{spec}').save_to_disk('data/hub')\"` "
    "(pip install 'qvlm[datasets]'), then pass --data data/hub (a DatasetDict folder reads its train split)")


def imagefolder_metadata(folder: Path) -> Path | None:
    """The `metadata.jsonl` / `metadata.csv` of an imagefolder (its `file_name` column names the images)."""
    return next((folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()), None)


def _looks_like_hub_id(spec: str) -> bool:
    """`owner/name` with no file suffix: what a hub dataset id looks like (and no local path does here)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not Path(spec).suffix


def _looks_like_shards(spec: str) -> bool:
    return spec.startswith("pipe:") or spec.endswith(".tar") or ("{" in spec and ".." in spec) or any(c in spec for c in "*?[")


# ---------------------------------------------------------------------------------------------------
# Manifests and tables


def record_from_fields(row: dict[str, Any], base: Path, key: str) -> Record:
    """Build a record from manifest fields; raise `BadSample("bad_record")` when required ones lack."""
    image = row.get("image") or row.get("image_path") or row.get("file_name")
    if not isinstance(image, str) or not image:
        raise BadSample("bad_record", f"{key}: no 'image' field{_did_you_mean(row, 'image')}")
    captions = _as_list(row.get("captions")) or _as_list(row.get("caption"))
    question = row.get("question") or None
    answers = _as_list(row.get("answers")) or _as_list(row.get("answer"))
    if question is None and not captions:
        raise BadSample("bad_record", f"{key}: needs 'caption(s)' or 'question'"
                                      f"{_did_you_mean(row, 'caption', 'captions', 'question')}")
    image_path = image if os.path.isabs(image) else str((base / image).resolve())
    meta = {k: v for k, v in row.items() if k not in KNOWN_FIELDS and v not in (None, "")}
    return Record(key=key, image_path=image_path, captions=captions, question=question, answers=answers,
                  answer_type=row.get("answer_type") or None, meta=meta)


def _did_you_mean(row: dict[str, Any], *wanted: str) -> str:
    """` (unknown field 'captoin': did you mean 'caption'?)` for the row's field closest to a wanted one."""
    for name in row:
        if name not in KNOWN_FIELDS:
            close = difflib.get_close_matches(str(name), wanted, n=1, cutoff=0.7)
            if close:
                return f" (unknown field {name!r}: did you mean {close[0]!r}?)"
    return ""


def _as_list(value: Any) -> list[str]:
    """A manifest value as a list of strings (VQAv2-style answer dicts give their "answer")."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [v.get("answer", "") if isinstance(v, dict) else str(v) for v in value]
    return [str(value)]


def _table_list(cell: str | None) -> list[str] | None:
    """A table cell holding several values: a JSON list, or `a|b|c`."""
    if not cell:
        return None
    if cell.startswith("["):
        try:
            return _as_list(json.loads(cell))
        except json.JSONDecodeError:
            pass
    return cell.split("|")


def read_jsonl(path: str | Path, skips: SkipCounter | None = None) -> Iterator[Record]:
    """Records of a JSONL manifest; a line that is not UTF-8, not JSON, not an object or lacks required
    fields is counted in `skips` as "bad_record" with its line number and why (the line is dropped)."""
    path = Path(path)
    base = path.resolve().parent
    with open(path, "rb") as f:  # bytes: one non-UTF-8 line is one bad record, not a failed read
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            key = f"{path.name}:{line_no}"
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise BadSample("bad_record", f"{key}: not a JSON object")
                yield record_from_fields(row, base, key)
            except UnicodeDecodeError:
                _count(skips, "bad_record", f"{key} (not UTF-8 text)")
            except (json.JSONDecodeError, RecursionError):
                _count(skips, "bad_record", f"{key} (not valid JSON)")
            except BadSample as e:
                _count(skips, e.reason, e.detail or key)


def read_table(path: str | Path, skips: SkipCounter | None = None) -> Iterator[Record]:
    path = Path(path)
    base = path.resolve().parent
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape: a non-UTF-8 byte becomes a lone surrogate that marks its row bad below
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for row_no, row in enumerate(csv.DictReader(f, delimiter=delimiter), start=2):
            key = f"{path.name}:{row_no}"
            try:
                if any(_has_surrogates(v) for v in [*row.keys(), *row.values()]):
                    raise BadSample("bad_record", f"{key} (not UTF-8 text)")
                fields = {k: v for k, v in row.items() if k}
                for name in ("captions", "answers"):
                    fields[name] = _table_list(fields.get(name))
                yield record_from_fields(fields, base, key)
            except BadSample as e:
                _count(skips, e.reason, e.detail or key)


def _has_surrogates(value: object) -> bool:
    if isinstance(value, list):  # DictReader's extra cells
        return any(_has_surrogates(v) for v in value)
    return isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value)


def _count(skips: SkipCounter | None, reason: str, key: str) -> None:
    if skips is not None:
        skips.skip(reason, key)


# ---------------------------------------------------------------------------------------------------
# WebDataset shards


def expand_braces(pattern: str) -> list[str]:
    """Expand `{00000..00099}` ranges (zero-padded as written) and `{a,b}` lists, like bash/braceexpand."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def expand_shards(spec: str) -> list[str]:
    """The shard paths of a brace pattern, glob, single tar or folder of tars, in order; `pipe:`
    commands (webdataset's convention) have their braces expanded and are never globbed."""
    if spec.startswith("pipe:"):
        return expand_braces(spec)
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    paths: list[str] = []
    for item in expand_braces(spec):
        paths.extend(sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item])
    if not paths:
        raise DataError(f"no shards match {spec}")
    return paths


def consumer_index(rank: int | None = None, world_size: int | None = None, worker_id: int | None = None,
                   num_workers: int | None = None) -> tuple[int, int]:
    """(this consumer's index, number of consumers) over processes × DataLoader workers."""
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if worker_id is None or num_workers is None:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker_id, world_size * num_workers


def iter_shards(shards: Sequence[str], skips: SkipCounter | None = None) -> Iterator[Record]:
    """The records of tar shards, in order (training streams them with `qvlm.data.stream`)."""
    for shard in shards:
        yield from _iter_tar(shard, skips)


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _iter_tar(shard: str, skips: SkipCounter | None) -> Iterator[Record]:
    """Group consecutive members by key (img2dataset writes a sample's files together)."""
    current: str | None = None
    files: dict[str, bytes] = {}
    try:
        with _open_tar(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _member_key(member.name)
                if key != current and current is not None:
                    yield from _sample_from_files(shard, current, files, skips)
                    files = {}
                current = key
                extracted = tar.extractfile(member)
                files[ext] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        _count(skips, "bad_shard", f"{shard}: {e}")  # a cut-off download: keep what was read
    if current is not None:
        yield from _sample_from_files(shard, current, files, skips)


@contextlib.contextmanager
def _open_tar(shard: str) -> Iterator[tarfile.TarFile]:
    """A tar opened for streaming (no seeking): a file, or the stdout of a `pipe:` command."""
    if not shard.startswith("pipe:"):
        with tarfile.open(shard, mode="r|*") as tar:
            yield tar
        return
    command = shard.removeprefix("pipe:")
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finished = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            yield tar
        finished = True
    finally:
        proc.stdout.close()
        if not finished:
            proc.kill()  # a reader that stopped early (or failed) must not leave the command running
        error = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise OSError(f"`{command}` exited with {code}: {error[-300:]}")


def _sample_from_files(shard: str, key: str, files: dict[str, bytes],
                       skips: SkipCounter | None) -> Iterator[Record]:
    record_key = f"{os.path.basename(shard)}/{key}"
    image_ext = next((e for e in files if "." + e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        _count(skips, "no_image", record_key)
        return
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else meta.get("caption")
    question = meta.get("question")
    if not caption and not question:
        _count(skips, "empty_caption", record_key)
        return
    yield Record(key=record_key, image_bytes=files[image_ext], captions=[caption] if caption else [],
                 question=question, answers=_as_list(meta.get("answers") or meta.get("answer")),
                 answer_type=meta.get("answer_type"),
                 meta={k: v for k, v in meta.items() if k in ("url", "key", "width", "height")})


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets folders


def read_hf_dataset(path: str | Path, split: str | None = None, image_column: str | None = None,
                    skips: SkipCounter | None = None) -> Iterator[Record]:
    """Records of a `save_to_disk` folder (a Dataset, or a DatasetDict: `split`, default "train")."""
    ds = load_hf_folder(path, split, image_column)
    return hf_rows_to_records(ds, Path(path).name, skips=skips)


def load_hf_folder(path: str | Path, split: str | None = None, image_column: str | None = None) -> Any:
    """A `save_to_disk` folder as a memory-mapped `datasets.Dataset` whose image column is `image`, kept
    encoded (bytes, not decoded)."""
    datasets = import_datasets(f"reading {path} (a Hugging Face datasets folder)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        ds = ds[split]
    return encoded_images(ds, image_column)


def import_datasets(purpose: str) -> Any:
    try:
        import datasets  # optional: only needed for this format
    except ImportError as e:
        raise missing_extra(e, purpose, extra="datasets") from e
    return datasets


def encoded_images(ds: Any, image_column: str | None = None) -> Any:
    """`ds` (Dataset or IterableDataset) with its image column renamed `image` and left encoded."""
    import datasets

    column = image_column or _find_image_column(ds)
    if column != "image":
        ds = ds.rename_column(column, "image")
    return ds.cast_column("image", datasets.Image(decode=False))  # keep the encoded bytes


def hf_rows_to_records(rows: Iterable[dict], name: str, skips: SkipCounter | None = None,
                       first_row: int = 0) -> Iterator[Record]:
    """Records of `datasets` rows whose `image` is `{"bytes", "path"}`; keys `<name>:<row number>`."""
    for row_no, row in enumerate(rows, start=first_row):
        key = f"{name}:{row_no}"
        image = row.pop("image") or {}
        try:
            data = image.get("bytes") or (Path(image["path"]).read_bytes() if image.get("path") else None)
        except OSError:
            data = None
        if not data:
            _count(skips, "missing", key)
            continue
        captions = _as_list(row.get("captions")) or _as_list(row.get("caption")) or _as_list(row.get("text"))
        question = row.get("question")
        if not captions and not question:
            _count(skips, "bad_record", key)
            continue
        yield Record(key=key, image_bytes=data, captions=captions, question=question,
                     answers=_as_list(row.get("answers")) or _as_list(row.get("answer")),
                     answer_type=row.get("answer_type"))


def _find_image_column(ds: Any) -> str:
    import datasets

    for name, feature in (ds.features or {}).items():  # a streamed hub dataset may not know its features
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "png"):
        if name in (ds.column_names or ()):
            return name
    raise DataError(f"no image column among {ds.column_names}: name it with an Image feature or `image`")


def load_records(spec: str | Path, skips: SkipCounter | None = None) -> list[Record]:
    """`read_records` as a list (map-style datasets)."""
    return list(read_records(spec, skips=skips))


def iter_unique_images(records: Iterable[Record]) -> Iterator[Record]:
    """One record per distinct image path/bytes key (VQA manifests repeat an image per question)."""
    seen: set[str] = set()
    for record in records:
        ident = record.image_path or record.key
        if ident not in seen:
            seen.add(ident)
            yield record

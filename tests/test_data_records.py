"""Readers: JSONL, CSV/TSV, WebDataset shards (with exact-once sharding), HF datasets folders."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest
from PIL import Image

from qvlm.data.images import DataError, SkipCounter
from qvlm.data.records import expand_braces, iter_shards, load_records, read_records


def jpeg(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg())
    rows = [
        {"image": "imgs/a.jpg", "caption": "a red square"},
        {"image": "imgs/a.jpg", "captions": ["one", "two"]},
        {"image": "imgs/a.jpg", "question": "what colour?", "answer": "red", "answer_type": "color"},
        {"image": "imgs/a.jpg", "question": "q?", "answers": ["x", "y", "y"], "question_id": 7},
        {"caption": "no image here"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n\n")
    return path


def test_jsonl_manifest(tmp_path):
    skips = SkipCounter()
    records = load_records(write_manifest(tmp_path), skips=skips)
    assert len(records) == 4 and skips.skipped["bad_record"] == 2
    a, b, c, d = records
    assert a.captions == ["a red square"] and a.image_path == str((tmp_path / "imgs" / "a.jpg").resolve())
    assert b.captions == ["one", "two"] and not b.is_vqa
    assert (c.question, c.answers, c.answer_type) == ("what colour?", ["red"], "color")
    assert d.best_answer() == "y" and d.meta == {"question_id": 7}
    assert a.open_image().size == (8, 8) and a.content_hash() == b.content_hash()
    assert a.key == "train.jsonl:1"


@pytest.mark.parametrize("sep,suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_csv_tsv(tmp_path, sep, suffix):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    rows = [["image", "caption", "captions", "question", "answers", "answer_type"],
            ["a.jpg", "a dog", "", "", "", ""],
            ["a.jpg", "", '["c1", "c2"]', "", "", ""],
            ["a.jpg", "", "", "is it?", "yes|yes|no", "yes/no"]]
    path = tmp_path / f"t{suffix}"
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows(rows)
    r = load_records(path)
    assert [x.captions for x in r] == [["a dog"], ["c1", "c2"], []]
    assert r[2].answers == ["yes", "yes", "no"] and r[2].answer_type == "yes/no"


def test_unknown_or_missing_spec(tmp_path):
    with pytest.raises(DataError):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError):
        read_records(tmp_path / "x.parquet")


def test_expand_braces():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]


def write_shards(folder, n_shards: int, per_shard: int) -> list[str]:
    """img2dataset layout: <key>.jpg + <key>.txt + <key>.json per sample."""
    folder.mkdir(exist_ok=True)
    captions = []
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = f"caption {s}-{i}"
                captions.append(caption)
                files = {"jpg": jpeg(), "json": json.dumps({"caption": caption, "url": "u"}).encode()}
                if i % 2 == 0:
                    files["txt"] = caption.encode()  # odd samples: caption only in the .json
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return captions


def test_webdataset_shards(tmp_path):
    captions = write_shards(tmp_path / "shards", 3, 4)
    records = load_records(str(tmp_path / "shards" / "{00000..00002}.tar"))
    assert [r.captions[0] for r in records] == captions
    assert records[0].image_bytes and records[0].key == "00000.tar/000000000"
    assert records[0].open_image().size == (8, 8)
    assert len(load_records(tmp_path / "shards")) == 12  # a folder of shards
    assert len(load_records(str(tmp_path / "shards" / "*.tar"))) == 12


def test_truncated_shard_keeps_what_was_read(tmp_path):
    write_shards(tmp_path / "s", 1, 6)
    data = (tmp_path / "s" / "00000.tar").read_bytes()
    (tmp_path / "s" / "00000.tar").write_bytes(data[: len(data) // 2])
    skips = SkipCounter()
    records = list(iter_shards([str(tmp_path / "s" / "00000.tar")], skips=skips))
    assert 0 < len(records) < 6 and skips.skipped["bad_shard"] == 1


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.jpg").write_bytes(jpeg())
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.jpg")] * 2, "caption": ["x", "y"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    records = load_records(tmp_path / "hf")
    assert [r.captions for r in records] == [["x"], ["y"]] and records[0].open_image().size == (8, 8)


def _bad_manifest(tmp_path, good: int = 100) -> tuple:
    """A stage-1 manifest of `good` usable lines and 80 bad ones of every kind (the issue's attack)."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "imgs" / "a.jpg").write_bytes(jpeg())
    bad = [b'{"image": "imgs/a.jpg", "caption": "cut off', b"not json at all", b"[1, 2, 3]", b'"a string"',
           b'{"caption": "no image field"}', b'{"image": "imgs/a.jpg", "captoin": "a typo"}',
           b'{"image": "imgs/a.jpg", "caption": "caf\xe9 in latin-1"}', b"[" * 100_000]
    bad = (bad * 10)[:80]
    lines = [json.dumps({"image": "imgs/a.jpg", "caption": f"shape {i}"}).encode() for i in range(good)]
    lines = [x for i, line in enumerate(lines) for x in ([line, bad[i]] if i < len(bad) else [line])]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(bad)


def test_every_malformed_manifest_line_is_counted_with_its_line_and_reason(tmp_path):
    path, n_bad = _bad_manifest(tmp_path)
    skips = SkipCounter("samples")
    records = list(read_records(path, skips=skips))  # the non-UTF-8 line no longer aborts the read
    assert len(records) == 100
    assert skips.skipped["bad_record"] == n_bad == 80
    report = skips.report()
    assert "m.jsonl:2 (not valid JSON)" in report  # line numbers of the first bad lines, and why
    examples = SkipCounter("samples", examples_per_reason=100)
    list(read_records(path, skips=examples))
    shown = examples.examples["bad_record"]
    assert any("unknown field 'captoin': did you mean 'caption'?" in e for e in shown)
    assert any("not UTF-8" in e for e in shown) and any("not a JSON object" in e for e in shown)
    assert any("no 'image' field" in e for e in shown)


def test_non_utf8_csv_row_is_a_bad_record(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "t.csv").write_bytes(b"image,caption\na.jpg,fine\na.jpg,caf\xe9\na.jpg,also fine\n")
    skips = SkipCounter()
    assert [r.captions for r in read_records(tmp_path / "t.csv", skips=skips)] == [["fine"], ["also fine"]]
    assert skips.skipped["bad_record"] == 1 and "t.csv:3 (not UTF-8 text)" in skips.examples["bad_record"]

"""Converters on fixtures in the real file layouts, and the `qvlm data` command end to end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from qvlm.cli.main import main
from qvlm.data.bundled import clean_clipart_title, easyvqa_caption, infer_colour_and_shape
from qvlm.data.records import load_records


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def test_coco_karpathy(tmp_path):
    image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg")
    image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000007.jpg")
    data = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "cocoid": 42,
         "sentences": [{"raw": "A dog. ", "tokens": ["a", "dog"]}, {"raw": "A brown dog."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "split": "restval",
         "cocoid": 7, "sentences": [{"raw": "A cat."}]},
    ]}
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps(data))
    assert main(["data", "coco", "--src", str(tmp_path / "coco" / "dataset_coco.json"),
                 "--out", str(tmp_path / "out")]) == 0
    test = load_records(tmp_path / "out" / "test.jsonl")
    assert test[0].captions == ["A dog.", "A brown dog."] and test[0].meta["cocoid"] == 42
    assert test[0].open_image().size == (8, 8)  # relative path resolves from the manifest folder
    assert load_records(tmp_path / "out" / "train.jsonl")[0].captions == ["A cat."]  # restval → train


def test_flickr30k_both_layouts(tmp_path):
    image(tmp_path / "f" / "flickr30k-images" / "1000092795.jpg")
    token = "1000092795.jpg#0\tTwo young guys .\n1000092795.jpg#1\tTwo men outside .\n"
    (tmp_path / "f" / "results_20130124.token").write_text(token)
    assert main(["data", "flickr30k", "--src", str(tmp_path / "f" / "results_20130124.token"),
                 "--out", str(tmp_path / "o1")]) == 0
    (rec,) = load_records(tmp_path / "o1" / "all.jsonl")
    assert rec.captions == ["Two young guys .", "Two men outside ."] and rec.open_image()
    karpathy = {"images": [{"filename": "1000092795.jpg", "split": "val", "sentences": [{"raw": "Two guys"}]}]}
    (tmp_path / "f" / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    assert main(["data", "flickr30k", "--src", str(tmp_path / "f" / "dataset_flickr30k.json"),
                 "--out", str(tmp_path / "o2")]) == 0
    (rec,) = load_records(tmp_path / "o2" / "val.jsonl")
    assert rec.captions == ["Two guys"] and rec.open_image()


def test_vqav2(tmp_path):
    image(tmp_path / "v" / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the dog?", "question_id": 420},
        {"image_id": 42, "question": "Is it sunny?", "question_id": 421}]}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["brown"] * 7 + ["tan"] * 3)]
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "other", "multiple_choice_answer": "brown",
         "answers": answers},
        {"question_id": 421, "image_id": 42, "answer_type": "yes/no", "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]}]}
    (tmp_path / "v" / "q.json").write_text(json.dumps(questions))
    (tmp_path / "v" / "a.json").write_text(json.dumps(annotations))
    assert main(["data", "vqav2", "--src", str(tmp_path / "v" / "q.json"), "--annotations",
                 str(tmp_path / "v" / "a.json"), "--out", str(tmp_path / "o")]) == 0
    first, second = load_records(tmp_path / "o" / "val2014.jsonl")
    assert first.question == "What color is the dog?" and len(first.answers) == 10
    assert first.best_answer() == "brown" and first.answer_type == "other" and first.meta["question_id"] == 420
    assert second.answer_type == "yes/no" and first.open_image().size == (8, 8)


def test_img2dataset_folder_and_shards(tmp_path):
    for i in range(10):
        image(tmp_path / "cc" / "00000" / f"{i:09d}.jpg")
        (tmp_path / "cc" / "00000" / f"{i:09d}.txt").write_text(f"caption {i}")
    assert main(["data", "img2dataset", "--src", str(tmp_path / "cc"), "--out", str(tmp_path / "o1")]) == 0
    train = load_records(tmp_path / "o1" / "train.jsonl")
    val = load_records(tmp_path / "o1" / "val.jsonl")
    assert len(train) == 9 and len(val) == 1 and train[0].open_image()
    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "00000.tar", "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="JPEG")
            for name, data in [(f"{i:09d}.jpg", buf.getvalue()),
                               (f"{i:09d}.json", json.dumps({"caption": f"c{i}"}).encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert main(["data", "img2dataset", "--src", str(tmp_path / "sh" / "{00000..00000}.tar"),
                 "--out", str(tmp_path / "o2"), "--val-fraction", "0.25"]) == 0
    records = load_records(tmp_path / "o2" / "train.jsonl") + load_records(tmp_path / "o2" / "val.jsonl")
    assert sorted(r.captions[0] for r in records) == ["c0", "c1", "c2", "c3"]
    assert all(r.open_image().size == (8, 8) for r in records)


def test_converter_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "coco", "--src", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 1
    assert "error" in capsys.readouterr().err


def test_easyvqa_caption_inference():
    qs = [("what color is the circle?", "blue"), ("is there not a red shape?", "yes")]
    assert infer_colour_and_shape(qs) == ("blue", "circle")
    qs = [("is no triangle present?", "no"), ("what is the color of the shape?", "teal")]
    assert infer_colour_and_shape(qs) == ("teal", "triangle")
    assert easyvqa_caption("red", None) == "a red shape"


def test_easyvqa_command(tmp_path):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "easy"
    assert main(["data", "easyvqa", "--out", str(out), "--json"]) == 0
    rows = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "val", "test")}

    def count(split, field):
        return sum(field in r for r in rows[split])

    assert count("train", "caption") + count("val", "caption") == 4000 and count("test", "caption") == 1000
    assert count("val", "caption") == 400
    assert count("train", "question") + count("val", "question") == 38575 and count("test", "question") == 9673
    train_images = {r["image"] for r in rows["train"]}
    assert not train_images & {r["image"] for r in rows["val"]}  # whole images held out
    captions = {r["caption"] for s in rows for r in rows[s] if "caption" in r}
    assert len(captions) == 24  # 8 colours × 3 shapes, all inferred
    assert {r["answer_type"] for r in rows["test"] if "question" in r} == {"yes/no", "shape", "color"}
    assert (out / rows["test"][0]["image"]).exists()


def test_clipart_title_cleaning():
    assert clean_clipart_title("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)") is None
    assert clean_clipart_title("gramastar", repeats=1375) is None
    assert clean_clipart_title("Clipart by Nicu Buculei - smiley111") is None
    assert clean_clipart_title("folder_bomb_01") is None  # a file name, not a title
    assert clean_clipart_title("Soft_Blue  Couch") == "soft blue couch"
    assert clean_clipart_title("Aircraft3") == "aircraft"
    assert clean_clipart_title("flamingSoccerBall") == "flaming soccer ball"


OPENCLIPART = Path("/usr/share/openclipart")


@pytest.mark.skipif(not (OPENCLIPART / "svg").is_dir(), reason="apt-get install openclipart-png openclipart-svg")
def test_openclipart_command(tmp_path):
    out = tmp_path / "oc"
    assert main(["data", "openclipart", "--out", str(out), "--limit", "120", "--max-side", "64",
                 "--val-fraction", "0.1", "--test-fraction", "0.2"]) == 0
    splits = {s: load_records(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    kept = sum(map(len, splits.values()))
    assert len(splits["train"]) == int(0.7 * kept) and len(splits["val"]) == int(0.1 * kept)
    records = [r for part in splits.values() for r in part]
    captions = [r.captions[0] for r in records]
    assert records and len(set(captions)) == len(captions)
    assert not any("collection" in c or "_" in c for c in captions)
    img = records[0].open_image()
    assert img.mode == "RGB" and max(img.size) <= 64


def test_openclipart_refuses_held_out_shares_that_leave_nothing_to_train(tmp_path, capsys):
    assert main(["data", "openclipart", "--out", str(tmp_path), "--val-fraction", "0.5", "--test-fraction", "0.5"]) == 1
    assert "fractions" in capsys.readouterr().err


def test_openclipart_missing_says_how_to_install(tmp_path, capsys):
    assert main(["data", "openclipart", "--out", str(tmp_path), "--root", str(tmp_path / "none")]) == 1
    assert "apt-get install openclipart-png openclipart-svg" in capsys.readouterr().err

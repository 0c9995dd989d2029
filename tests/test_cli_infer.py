"""`qvlm caption`, `qvlm ask` and `qvlm search` run for real on tiny untrained runs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm.cli.main import main


def _make_run(run: Path, stage: int) -> Path:
    from qvlm.config import get_preset
    from qvlm.models.vlm import QVLM

    QVLM.build(get_preset("tiny"), stage=stage).save_pretrained(run / "model")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {1: _make_run(root / "s1", 1), 2: _make_run(root / "s2", 2)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 5 random 32x32 PNGs (plus a non-image file that expansion must ignore)."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def corrupt(tmp_path) -> Path:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a jpeg")
    return path


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_caption_json_with_a_corrupt_image(runs, images, corrupt, capsys):
    good = images / "0.png"
    rc = main(["caption", str(runs[2]), str(good), str(corrupt), "--json", "--max-new-tokens", "3"])
    objs = _json_lines(capsys.readouterr().out)
    assert rc == 1  # one image failed
    assert [o["image"] for o in objs] == [str(good), str(corrupt)]
    assert set(objs[0]) == {"image", "text", "seconds"} and isinstance(objs[0]["text"], str)
    assert objs[0]["seconds"] >= 0
    assert set(objs[1]) == {"image", "error"} and "corrupt" in objs[1]["error"]


def test_caption_folder_batched_with_beams(runs, images, capsys):
    rc = main(["caption", str(runs[2]), str(images), "--json", "--batch-size", "2", "--beams", "2",
               "--max-new-tokens", "2"])
    objs = _json_lines(capsys.readouterr().out)
    assert rc == 0
    assert [Path(o["image"]).name for o in objs] == [f"{i}.png" for i in range(5)]
    assert all("text" in o for o in objs)


def test_ask_json_and_plain(runs, images, capsys):
    rc = main(["ask", str(runs[2]), str(images / "1.png"), "what color is the shape?", "--json",
               "--max-new-tokens", "2", "--temperature", "0.7", "--top-p", "0.9"])
    objs = _json_lines(capsys.readouterr().out)
    assert rc == 0 and len(objs) == 1 and set(objs[0]) == {"image", "text", "seconds"}
    assert main(["ask", str(runs[2]), str(images / "1.png"), "what shape?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{images / '1.png'}: ")


def test_stage1_caption_is_a_one_line_error(runs, images, capsys):
    rc = main(["caption", str(runs[1]), str(images / "0.png")])
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # library warnings may precede it
    assert rc == 1 and captured.out == ""
    assert last.startswith("qvlm caption: error:") and "stage-1" in last


def test_missing_image_is_a_user_error(runs, tmp_path, capsys):
    assert main(["caption", str(runs[2]), str(tmp_path / "nope.png")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_search_sorted_and_cached_where_training_caches(runs, images, private_cache, monkeypatch, capsys):
    from qvlm.models.vision import FrozenVisionEncoder

    calls = {"images": 0}
    forward = FrozenVisionEncoder.forward

    def counting(self, pixel_values):
        calls["images"] += pixel_values.shape[0]
        return forward(self, pixel_values)

    monkeypatch.setattr(FrozenVisionEncoder, "forward", counting)
    args = ["search", str(runs[1]), "a red square", "--images", str(images), "--top-k", "3", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    scores = [h["score"] for h in first["hits"]]
    assert len(first["hits"]) == 3 and scores == sorted(scores, reverse=True)
    assert [h["rank"] for h in first["hits"]] == [1, 2, 3]
    assert first["n_images"] == 5 and first["encoded"] == 5 and calls["images"] == 5
    assert (private_cache / "features").is_dir()  # the run's training cache (train.feature_cache unset)
    assert not (runs[1] / "cache").exists()

    assert main(args) == 0  # same folder again: features come from the cache
    second = json.loads(capsys.readouterr().out)
    assert second["encoded"] == 0 and calls["images"] == 5
    assert second["hits"] == first["hits"]


def test_search_top_k_larger_than_folder(runs, images, tmp_path, capsys):
    rc = main(["search", str(runs[2]), "anything", "--images", str(images), "--top-k", "50",
               "--cache", str(tmp_path / "c")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 5

"""Report files: valid PNGs, escaped self-contained HTML, malformed log lines skipped."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm.eval.report import (
    plot_loss_curves,
    plot_query_attention,
    plot_similarity_grid,
    read_metrics_log,
    write_gallery,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()  # raises on a truncated / corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def _write_log(path: Path) -> None:
    lines = [json.dumps({"stage": "stage1", "step": s, "loss": 3.0 / s, "lr": 1e-4, "samples_per_s": 50.1})
             for s in range(1, 41)]  # fmt: skip
    lines += [json.dumps({"stage": "stage1", "step": 20, "val_loss": 0.5, "val_r1": 0.3})]
    lines += [json.dumps({"stage": "stage2", "step": s, "loss": 2.0 - 0.01 * s}) for s in range(1, 31)]
    lines += [json.dumps({"stage": "stage2", "step": 30, "val_loss": 1.8, "val_vqa": 0.7})]
    lines += [
        "{not json",  # malformed: bad JSON
        "[1, 2]",  # malformed: not an object
        json.dumps({"stage": "stage1", "loss": 1.0}),  # malformed: no step
        json.dumps({"stage": "stage1", "step": 5, "loss": "high"}),  # malformed: non-numeric loss
        '{"stage": "stage1", "step": 6, "loss": NaN}',  # malformed: non-finite loss
        "",  # blank: ignored, not counted
        json.dumps({"stage": "stage1", "step": 7, "lr": 1e-4}),  # valid, just no loss
    ]
    path.write_text("\n".join(lines) + "\n")


def test_read_metrics_log_counts_and_skips(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    _write_log(log_path)
    log = read_metrics_log(log_path)
    assert list(log.stages) == ["stage1", "stage2"]
    assert log.n_skipped == 5
    assert log.n_lines == 40 + 1 + 30 + 1 + 6
    assert len(log.stages["stage1"].train_loss) == 40 and log.stages["stage1"].val_loss == [(20.0, 0.5)]
    assert len(log.stages["stage2"].train_loss) == 30 and log.stages["stage2"].val_loss == [(30.0, 1.8)]


def test_plot_loss_curves_writes_png(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    _write_log(log_path)
    out = tmp_path / "reports" / "loss.png"
    log = plot_loss_curves(log_path, out)
    _assert_png(out)
    assert log.n_skipped == 5
    with Image.open(out) as im:  # two stages -> two side-by-side subplots: wider than tall
        assert im.width > im.height


def test_plot_loss_curves_empty_log(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    log_path.write_text("garbage\n")
    log = plot_loss_curves(log_path, tmp_path / "loss.png")
    _assert_png(tmp_path / "loss.png")
    assert log.n_skipped == 1 and not log.stages


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
    gray16 = Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16))  # mode I;16
    pal = Image.new("P", (50, 30), 3)
    return [rgb, rgba, gray16, pal]


def test_plot_similarity_grid_writes_png(tmp_path):
    imgs = _images()
    captions = ["a noisy picture", "a red square", "a grey square", "a flat " + "long " * 30 + "caption"]
    sim = np.eye(4) * 0.5 + 0.1
    out = plot_similarity_grid(imgs, captions, sim, tmp_path / "sim.png")
    _assert_png(out)
    with pytest.raises(ValueError):
        plot_similarity_grid(imgs, captions[:3], sim, tmp_path / "bad.png")


def test_plot_query_attention_draws_a_row_per_image_and_a_column_per_query(tmp_path):
    imgs = _images()  # 4 images
    maps = np.random.default_rng(0).random((4, 32, 8, 8))
    few = plot_query_attention(imgs, maps[:, :4], tmp_path / "few.png")
    many = plot_query_attention(imgs, maps, tmp_path / "many.png", max_queries=12)
    _assert_png(few)
    with Image.open(few) as a, Image.open(many) as b:
        assert a.height == b.height and b.width > 2 * a.width  # 1 + 1 + 4 columns vs 1 + 1 + 12
    with pytest.raises(ValueError, match="expected"):
        plot_query_attention(imgs[:3], maps, tmp_path / "bad.png")


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag in ("script", "link"):
            raise AssertionError(f"unexpected <{tag}> in the gallery")

    def handle_data(self, data):
        self.text.append(data)


def test_write_gallery(tmp_path):
    img_path = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(img_path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    evil = "a cat <script>alert('x')</script> & a dog"
    items = [
        {"image": _images()[0], "prediction": evil, "references": ["a cat", "a <b>dog</b>"], "correct": True},
        {
            "image": img_path,
            "prediction": "blue",
            "references": ["blue"],
            "question": "what color?",
            "correct": False,
        },
        {
            "image": _images()[2],
            "prediction": "circle",
            "references": [],
            "correct": None,
            "extra": {"ms": 12.5},
        },
        {"image": tmp_path / "broken.jpg", "prediction": "??", "references": ["x"]},  # placeholder image
    ]
    out = write_gallery(items, tmp_path / "g" / "gallery.html", title="Test <gallery>")
    page = out.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)  # raises on <script>: the evil caption must be escaped
    text = "".join(parser.text)
    assert evil in text and "a <b>dog</b>" in text and "what color?" in text  # unescaped by the parser
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert page.count("<img") == len(items) == parser.tags.count("img")
    assert all(s.startswith("data:image/jpeg;base64,") for s in parser.srcs)  # inlined, no external files
    assert "http://" not in page and "https://" not in page
    assert "4 example(s) · 1 / 2 correct (50.0%)" in text
    assert "Test <gallery>" in text

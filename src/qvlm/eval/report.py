"""Report files written into a run folder: loss curves (PNG), image x caption similarity grid (PNG),
where the Q-Former's queries look (PNG), which queries each generated word drew on (PNG) and a
self-contained HTML gallery of predictions.

Figures are drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``),
never through pyplot: no window opens, no global backend is switched, and it works headless and in
threads (the server).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["read_metrics_log", "plot_loss_curves", "plot_similarity_grid", "plot_query_attention",
           "plot_word_query_attention", "write_gallery", "LossLog"]


# ----------------------------------------------------------------------------------------------
# Loss curves
# ----------------------------------------------------------------------------------------------


@dataclass
class StageCurves:
    """Points of one training stage, each list of (step, value) sorted by step."""

    train_loss: list[tuple[float, float]] = field(default_factory=list)
    val_loss: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class LossLog:
    """A parsed metrics.jsonl: curves per stage (in order of first appearance) and line counts."""

    stages: dict[str, StageCurves] = field(default_factory=dict)
    n_lines: int = 0
    n_skipped: int = 0


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_metrics_log(metrics_jsonl: Path) -> LossLog:
    """Parse a training log (JSONL, one object a line, e.g.
    ``{"stage": "stage1", "step": 10, "loss": 2.3, ...}`` or ``{"stage": ..., "step": 200,
    "val_loss": 2.0, ...}``).

    A line is skipped (and counted in ``n_skipped``) when it is not a JSON object, has no numeric
    ``step``, or has a ``loss`` / ``val_loss`` that is not a finite number (a diverged step must not
    wreck the plot's scale). Blank lines are ignored; lines with neither loss are valid, just unused.
    Lines without ``stage`` go to stage ``"train"``.
    """
    log = LossLog()
    with open(metrics_jsonl, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            log.n_lines += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.n_skipped += 1
                continue
            if not isinstance(rec, dict) or not _finite_number(rec.get("step")):
                log.n_skipped += 1
                continue
            losses = {k: rec[k] for k in ("loss", "val_loss") if k in rec}
            if not all(_finite_number(v) for v in losses.values()):
                log.n_skipped += 1
                continue
            curves = log.stages.setdefault(str(rec.get("stage", "train")), StageCurves())
            if "loss" in losses:
                curves.train_loss.append((float(rec["step"]), float(losses["loss"])))
            if "val_loss" in losses:
                curves.val_loss.append((float(rec["step"]), float(losses["val_loss"])))
    for c in log.stages.values():
        c.train_loss.sort(key=lambda p: p[0])  # stable: a resumed run's repeated steps keep log order
        c.val_loss.sort(key=lambda p: p[0])
    return log


def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), [N] -> [N]."""
    out = np.empty_like(values)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm  # dividing by the weight sum removes the pull towards 0 at the start
    return out


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, format="png", dpi=fig.dpi)
    return out_png


def plot_loss_curves(metrics_jsonl: Path, out_png: Path, smoothing: float = 0.9) -> LossLog:
    """Plot training curves from a metrics.jsonl, one subplot per stage.

    Train loss is drawn raw (faint) and smoothed (debiased EMA with ``smoothing`` weight); validation
    loss as markers. The y axis turns logarithmic when the losses span more than 20x. A log with no
    usable point still gives a (labelled, empty) figure.

    Returns:
        The parsed :class:`LossLog` (so callers can report ``n_skipped`` malformed lines).
    """
    log = read_metrics_log(Path(metrics_jsonl))
    names = list(log.stages) or ["(no data)"]
    fig = Figure(figsize=(6.5 * len(names), 4.2), dpi=100, layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        curves = log.stages.get(name, StageCurves())
        _draw_stage(ax, curves, smoothing)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    if log.n_skipped:
        fig.suptitle(f"{log.n_skipped} malformed log line(s) skipped", fontsize=9, color="0.4")
    _save(fig, Path(out_png))
    return log


def _draw_stage(ax: Any, curves: StageCurves, smoothing: float) -> None:
    values: list[float] = []
    if curves.train_loss:
        x, y = np.array(curves.train_loss).T
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
        ax.plot(x, _ema(y, smoothing), color="tab:blue", linewidth=1.8, label="train (smoothed)")
        values += y.tolist()
    if curves.val_loss:
        x, y = np.array(curves.val_loss).T
        ax.plot(x, y, "o--", color="tab:orange", markersize=5, linewidth=1, label="validation")
        values += y.tolist()
    if not values:
        ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes)
        return
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)


# ----------------------------------------------------------------------------------------------
# Similarity grid
# ----------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (P, LA, RGBA, CMYK, I;16, F, ...) -> RGB; transparency composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=1.0))
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def plot_similarity_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    sim: Any,
    out_png: Path,
    title: str = "image-text similarity",
) -> Path:
    """The CLIP/BLIP demo figure: images as column headers, captions as row labels, the similarity
    heatmap between them with each value written in its cell.

    Args:
        images: Ni PIL images (any mode).
        captions: Nt captions.
        sim: similarity [Ni, Nt] (array or tensor), the same layout as ``recall_at_k``; drawn
            transposed so that row r is caption r and column c is image c.
        out_png: where to write the PNG (parent folders are created).
    """
    s = np.asarray(sim.detach().float().cpu() if hasattr(sim, "detach") else sim, dtype=np.float64)
    if s.shape != (len(images), len(captions)):
        raise ValueError(f"sim has shape {s.shape}, expected [{len(images)}, {len(captions)}]")
    grid = s.T  # [Nt, Ni]: rows = captions, columns = images
    n_txt, n_img = grid.shape
    fig = Figure(figsize=(3.2 + 1.1 * n_img, 1.6 + 0.75 * n_txt), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    heat = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="equal")
    mid = (vmin + vmax) / 2
    for r in range(n_txt):
        for c in range(n_img):
            v = grid[r, c]
            ax.text(
                c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if v > mid else "white"
            )
    for c, img in enumerate(images):
        thumb = _to_rgb(img)
        thumb.thumbnail((96, 96))  # small copies keep the figure light whatever the input size
        ax.imshow(np.asarray(thumb), extent=(c - 0.45, c + 0.45, -0.6, -1.5), origin="upper")
    ax.set_xlim(-0.5, n_img - 0.5)
    ax.set_ylim(n_txt - 0.5, -1.6)  # leave the band above row 0 for the image headers
    ax.set_xticks([])
    ax.set_yticks(range(n_txt), [textwrap.shorten(c, 60, placeholder="...") for c in captions], fontsize=9)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(heat, ax=ax, shrink=0.7)
    ax.set_title(title)
    return _save(fig, Path(out_png))


# ----------------------------------------------------------------------------------------------
# Query attention maps
# ----------------------------------------------------------------------------------------------


def plot_query_attention(images: Sequence[Image.Image], maps: Any, out_png: Path, max_queries: int = 16,
                         title: str = "where each query looks (cross-attention over the patches)") -> Path:
    """One row per image: the image, the mean map of all queries over it, then each query's map.

    Args:
        images: N PIL images (any mode), shown square as the encoder sees them.
        maps: [N, Nq, G, G] attention over the G x G patch grid (array or tensor), e.g.
            ``QFormer.query_attention`` cut to the patches and reshaped; each map is scaled to its own
            maximum, so a query that looks at one patch is as visible as one that spreads out.
        out_png: where to write the PNG (parent folders are created).
        max_queries: queries drawn per row (the first ones); the title says when some are left out.
    """
    m = np.asarray(maps.detach().float().cpu() if hasattr(maps, "detach") else maps, dtype=np.float64)
    if m.ndim != 4 or m.shape[0] != len(images) or m.shape[2] != m.shape[3]:
        raise ValueError(f"maps has shape {m.shape}, expected [{len(images)}, Nq, G, G]")
    shown = min(m.shape[1], max_queries)
    columns = [("mean", m.mean(axis=1))] + [(f"query {q}", m[:, q]) for q in range(shown)]
    fig = Figure(figsize=(1.3 * (len(columns) + 1), 1.45 * len(images) + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(len(images), len(columns) + 1, squeeze=False)
    for row, img in enumerate(images):
        picture = np.asarray(_to_rgb(img).resize((128, 128)))
        axes[row, 0].imshow(picture)
        for col, (name, column) in enumerate(columns, start=1):
            heat = column[row] / max(float(column[row].max()), 1e-12)
            axes[row, col].imshow(picture)
            axes[row, col].imshow(heat, cmap="inferno", alpha=0.6, extent=(0, 128, 128, 0), interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    left_out = f" ({shown} of {m.shape[1]} queries shown)" if shown < m.shape[1] else ""
    fig.suptitle(title + left_out, fontsize=10)
    return _save(fig, Path(out_png))


def plot_word_query_attention(images: Sequence[Image.Image], samples: Sequence[Mapping[str, Any]], out_png: Path,
                              title: str = "which queries each generated word drew on") -> Path:
    """One row per image: the image, a heat table of its generated tokens (rows) over the Q-Former's
    queries (columns), and beside it each token's image share.

    Args:
        images: N PIL images (any mode).
        samples: N dicts as ``QVLM.word_query_attention`` returns them: ``tokens`` (T text pieces),
            ``queries`` [T, Nq] (the token's attention on the image slots, divided by its total, so each
            row sums to 1) and ``image_share`` [T] (that total: the share of the token's whole attention
            that went to the image slots, 0..1). One colour scale (0 to the largest share) for all tables.
        out_png: where to write the PNG (parent folders are created).
    """
    if len(samples) != len(images):
        raise ValueError(f"{len(images)} images but {len(samples)} samples")
    tables = [np.asarray(s["queries"], dtype=np.float64) for s in samples]  # [T, Nq] each
    top = max((float(t.max()) for t in tables if t.size), default=1.0)
    heights = [max(len(s["tokens"]), 4) for s in samples]  # a short answer still leaves room for its image
    n_queries = max(t.shape[1] for t in tables)
    fig = Figure(figsize=(4.2 + 0.3 * n_queries, 0.8 + 0.24 * sum(heights)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(len(images), 3, height_ratios=heights, width_ratios=[2.2, 0.3 * n_queries, 0.5])
    for row, (img, sample, table) in enumerate(zip(images, samples, tables, strict=True)):
        picture = fig.add_subplot(grid[row, 0])
        picture.imshow(np.asarray(_to_rgb(img).resize((128, 128))))
        picture.set_axis_off()
        heat = _draw_word_table(fig.add_subplot(grid[row, 1]), sample["tokens"], table, top)
        _draw_image_share(fig.add_subplot(grid[row, 2]), np.asarray(sample["image_share"], dtype=np.float64))
    fig.colorbar(heat, ax=fig.axes, shrink=0.6, label="share of the word's image attention")
    fig.suptitle(title, fontsize=10)
    return _save(fig, Path(out_png))


def _draw_word_table(ax: Any, tokens: Sequence[str], table: np.ndarray, top: float) -> Any:
    """Tokens x queries heat map [T, Nq]; returns the image for the colour bar."""
    blank = np.full((1, table.shape[1]), np.nan)  # no token: an empty row keeps the queries' axis
    heat = ax.imshow(table if len(tokens) else blank, cmap="viridis", vmin=0.0, vmax=top, aspect="auto",
                     interpolation="nearest")
    if not tokens:
        ax.text(0.5, 0.5, "no word generated", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens], fontsize=7)  # quotes show the spaces
    ax.set_xticks(range(table.shape[1]), [str(q) for q in range(table.shape[1])], fontsize=6)
    ax.set_xlabel("query", fontsize=8)
    return heat


def _draw_image_share(ax: Any, share: np.ndarray) -> None:
    """Each token's share of attention on the image slots [T], as a column of percentages."""
    ax.imshow(share[:, None] if share.size else np.full((1, 1), np.nan), cmap="Greens", vmin=0.0, vmax=1.0,
              aspect="auto")
    for r, value in enumerate(share):
        ax.text(0, r, f"{100 * value:.0f}%", ha="center", va="center", fontsize=7,
                color="white" if value > 0.5 else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("on image", fontsize=8)


# ----------------------------------------------------------------------------------------------
# HTML gallery
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222;
       background: #fafafa; }
h1 { font-size: 1.4em; margin-bottom: 4px; }
.summary { color: #555; margin-bottom: 18px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px; }
.card.ok { border-left: 5px solid #2e9d4f; } .card.bad { border-left: 5px solid #c93c3c; }
.card img { display: block; max-width: 100%; max-height: 256px; margin: 0 auto 8px; border-radius: 4px;
            image-rendering: auto; }
.label { font-size: 0.75em; text-transform: uppercase; color: #888; letter-spacing: 0.04em; }
.pred { font-weight: 600; margin: 2px 0 8px; } .q { font-style: italic; margin: 2px 0 8px; }
ul.refs { margin: 2px 0 8px; padding-left: 18px; color: #444; }
table.extra { font-size: 0.8em; color: #555; border-collapse: collapse; }
table.extra td { padding: 1px 6px 1px 0; vertical-align: top; }
.badge { float: right; font-size: 0.8em; padding: 1px 6px; border-radius: 4px; color: #fff; }
.badge.ok { background: #2e9d4f; } .badge.bad { background: #c93c3c; }
"""


def _thumbnail_data_uri(image: Image.Image | str | Path, size: int) -> tuple[str, str]:
    """(data URI of a JPEG thumbnail, alt text). An unreadable image gives a grey placeholder, so a
    bad file never stops the report."""
    try:
        if isinstance(image, Image.Image):
            img, alt = _to_rgb(image), ""
        else:
            with Image.open(image) as opened:  # closes the file handle
                img, alt = _to_rgb(opened), Path(image).name
        img.thumbnail((size, size))
    except Exception as e:  # noqa: BLE001 - any decode error becomes a placeholder
        img, alt = Image.new("RGB", (size, size), (200, 200, 200)), f"unreadable image: {e}"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), alt


def _item_html(item: Mapping[str, Any], thumb_size: int) -> str:
    esc = html.escape
    uri, alt = _thumbnail_data_uri(item["image"], thumb_size)
    correct = item.get("correct")
    cls = "" if correct is None else (" ok" if correct else " bad")
    parts = [f'<div class="card{cls}">']
    if correct is not None:
        parts.append(f'<span class="badge{cls}">{"correct" if correct else "wrong"}</span>')
    parts.append(f'<img src="{uri}" alt="{esc(alt)}">')
    if item.get("question"):
        parts.append(f'<div class="label">question</div><div class="q">{esc(str(item["question"]))}</div>')
    parts.append(
        f'<div class="label">prediction</div><div class="pred">{esc(str(item.get("prediction", "")))}</div>'
    )
    refs = item.get("references") or []
    if refs:
        lis = "".join(f"<li>{esc(str(r))}</li>" for r in refs)
        parts.append(f'<div class="label">references</div><ul class="refs">{lis}</ul>')
    extra = item.get("extra") or {}
    if extra:
        rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in extra.items())
        parts.append(f'<table class="extra">{rows}</table>')
    parts.append("</div>")
    return "\n".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _summary_line(items: Sequence[Mapping[str, Any]]) -> str:
    judged = [it["correct"] for it in items if it.get("correct") is not None]
    line = f"{len(items)} example(s)"
    if judged:
        n_ok = sum(bool(c) for c in judged)
        line += f" · {n_ok} / {len(judged)} correct ({100.0 * n_ok / len(judged):.1f}%)"
    return line


def write_gallery(
    items: Sequence[Mapping[str, Any]],
    out_html: Path,
    title: str,
    thumb_size: int = 256,
) -> Path:
    """Write a self-contained HTML page of examples: image, prediction, references.

    Args:
        items: dicts with ``image`` (PIL.Image or path), ``prediction`` (str), ``references``
            (list[str]); optional ``question`` (str), ``correct`` (bool or None: green / red
            border), ``extra`` (dict of small values shown as a table, e.g. scores, latency).
        out_html: the file to write (parent folders are created).
        title: page title and heading.
        thumb_size: longest side of the inlined JPEG thumbnails, in pixels.

    All text is HTML-escaped; images are inlined as base64 JPEG, there is no external resource, so
    the file can be mailed or opened offline. A summary line (count, accuracy when ``correct`` is
    given) heads the page.
    """
    esc = html.escape
    cards = "\n".join(_item_html(it, thumb_size) for it in items)
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<div class='summary'>{esc(_summary_line(items))}</div>\n"
        f"<div class='grid'>\n{cards}\n</div>\n</body>\n</html>\n"
    )
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html

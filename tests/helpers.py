"""Synthetic data the tests build themselves."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qvlm.models.processing import build_stage2_batch

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SHAPES = ("square", "circle")


def shape_image(colour: str, shape: str, seed: int, size: int = 32) -> Image.Image:
    a = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    region = (abs(yy - c) < size // 4) & (abs(xx - c) < size // 4) if shape == "square" else \
        (yy - c) ** 2 + (xx - c) ** 2 < (size // 4) ** 2
    a[region] = COLOURS[colour]
    noise = np.random.default_rng(seed).integers(-10, 10, a.shape)
    return Image.fromarray(np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8))


def write_shapes_dataset(root: Path, n_train: int = 40, n_val: int = 8) -> tuple[Path, Path]:
    """Coloured shapes with a caption and a colour question each: train.jsonl and val.jsonl."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for i in range(n_train + n_val):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        shape_image(colour, shape, seed=i).save(root / "imgs" / f"{i}.png")
        rows = splits["train" if i < n_train else "val"]
        rows.append({"image": f"imgs/{i}.png", "caption": f"a {colour} {shape}"})
        rows.append({"image": f"imgs/{i}.png", "question": "what color is the shape?", "answer": colour,
                     "answer_type": "color"})
    for name, rows in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl", root / "val.jsonl"


def train_stage2_steps(model, features, prompts, answers, steps=300, lr=3e-3) -> float:
    """Plain AdamW on one fixed stage-2 batch until the loss is below 0.01; returns the last loss."""
    params = [p for group in model.trainable_parameters().values() for p in group]
    opt = torch.optim.AdamW(params, lr=lr)
    batch = build_stage2_batch(model.tokenizer, prompts, answers, model.qformer.num_queries)
    model.train()
    for _ in range(steps):
        loss = model(features, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return loss.item()


def write_shape_shards(root: Path, records: int = 40, shards: int = 4) -> str:
    """The shapes of tests/helpers.py as img2dataset-style shards: png + txt caption + json question."""
    root.mkdir(parents=True, exist_ok=True)
    per = records // shards
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
                buf = io.BytesIO()
                shape_image(colour, shape, seed=i).save(buf, format="PNG")
                meta = {"question": "what color is the shape?", "answer": colour, "answer_type": "color"}
                for ext, data in (("png", buf.getvalue()), ("txt", f"a {colour} {shape}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

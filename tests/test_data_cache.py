"""Feature cache: encoder runs once per image, rebuilt when the encoder key changes, crash-safe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qvlm.data.cache import FeatureCache
from qvlm.data.records import load_records


class FakeEncoder(nn.Module):
    """The FrozenVisionEncoder interface; features are the mean colour, so they are checkable."""

    def __init__(self, size: int = 8, patches: int = 4):
        super().__init__()
        self.size, self.patches = size, patches
        self.cache_key = f"fake-encoder@{size}px"
        self.calls = 0
        self.images_seen = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """→ [B, 3, size, size] in [0, 1]."""
        arrays = [np.asarray(im.resize((self.size, self.size)), dtype=np.float32) for im in images]
        return torch.stack([torch.from_numpy(a).permute(2, 0, 1) / 255 for a in arrays])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """→ [B, P, 3]: the mean colour repeated over P patches."""
        self.calls += 1
        self.images_seen += pixel_values.shape[0]
        return pixel_values.mean(dim=(2, 3))[:, None, :].expand(-1, self.patches, -1).contiguous()


def make_dataset(tmp_path, n: int = 7, bad: int = 1):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 30, 0, 255 - i * 30)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": f"image {i}"})
        rows.append({"image": f"imgs/{i}.png", "question": "q?", "answer": "a"})  # same image again
    for j in range(bad):
        (tmp_path / "imgs" / f"bad{j}.png").write_bytes(b"garbage")
        rows.append({"image": f"imgs/bad{j}.png", "caption": "broken"})
    rows.append({"image": "imgs/missing.png", "caption": "missing"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_records(path)


def test_build_get_and_reuse(tmp_path):
    records = make_dataset(tmp_path)
    encoder = FakeEncoder()
    cache = FeatureCache(tmp_path / "cache", encoder, shard_size=3)
    skips = cache.build(records, batch_size=2, progress=False)
    assert encoder.images_seen == 7 and len(cache) == 7
    assert skips.skipped == {"corrupt": 1, "missing": 1}
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 3  # 3 + 3 + 1
    feats = cache.get([records[0].content_hash(), records[2].content_hash()])
    assert feats.shape == (2, 4, 3) and feats.dtype == torch.float32
    assert torch.allclose(feats[1, 0], torch.tensor([30, 0, 225]) / 255, atol=1e-3)  # fp16 on disk

    # A new process (new objects, same folder): nothing is encoded again.
    encoder2 = FakeEncoder()
    cache2 = FeatureCache(tmp_path / "cache", encoder2)
    cache2.build(make_records_again(tmp_path), progress=False)
    assert encoder2.calls == 0 and cache2.stats["hits"] == 7 and cache2.stats["misses"] == 0
    assert cache2.stats["hit_rate"] == 1.0 and cache2.stats["bytes"] > 0
    assert torch.equal(cache2.get([records[0].content_hash()]), feats[:1])


def make_records_again(tmp_path):
    return load_records(tmp_path / "data.jsonl")


def test_new_input_size_rebuilds(tmp_path):
    records = make_dataset(tmp_path)
    FeatureCache(tmp_path / "cache", FakeEncoder(size=8)).build(records, progress=False)
    bigger = FakeEncoder(size=16)
    cache = FeatureCache(tmp_path / "cache", bigger)
    assert len(cache) == 0 and not cache.has(records[0].content_hash())
    cache.build(records, progress=False)
    assert bigger.images_seen == 7
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per encoder key


def test_interrupted_build_leaves_no_partial_shard(tmp_path, monkeypatch):
    records = make_dataset(tmp_path, n=6, bad=0)
    encoder = FakeEncoder()
    cache = FeatureCache(tmp_path / "cache", encoder, shard_size=2)
    import qvlm.data.cache as cache_module

    real_save = cache_module.save_file
    calls = {"n": 0}

    def save_then_die(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die half-way through writing the second shard
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_module, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.build(records, batch_size=2, progress=False)
    monkeypatch.setattr(cache_module, "save_file", real_save)
    assert [p.name for p in cache.dir.glob("shard-*")] == ["shard-000000.safetensors"]

    resumed = FakeEncoder()
    cache = FeatureCache(tmp_path / "cache", resumed, shard_size=2)
    assert len(cache) == 2
    cache.build(records, batch_size=2, progress=False)
    assert resumed.images_seen == 4 and len(cache) == 6
    assert not list(cache.dir.glob(".*.tmp"))  # the dead write's temp file is cleaned up
    good = [r for r in records if "missing" not in r.image_path]
    assert cache.get([r.content_hash() for r in good]).shape == (len(good), 4, 3)


def test_shard_written_but_index_not_is_recovered(tmp_path):
    records = make_dataset(tmp_path, n=3, bad=0)
    cache = FeatureCache(tmp_path / "cache", FakeEncoder())
    cache.build(records, progress=False)
    (cache.dir / "index.json").unlink()  # as if killed between the shard rename and the index rename
    encoder = FakeEncoder()
    again = FeatureCache(tmp_path / "cache", encoder)
    again.build(records, progress=False)
    assert len(again) == 3 and encoder.calls == 0


def test_read_only_with_cache_key(tmp_path):
    records = make_dataset(tmp_path, n=2, bad=0)
    FeatureCache(tmp_path / "cache", FakeEncoder()).build(records, progress=False)
    reader = FeatureCache(tmp_path / "cache", cache_key=FakeEncoder().cache_key)
    assert reader.get([records[0].content_hash()]).shape == (1, 4, 3)
    with pytest.raises(KeyError):
        reader.get(["0" * 64])

"""Streaming data (issue 19): shards of every kind, the exact-once split, shuffle, exact resume, disk checks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import shape_image
from torch.utils.data import DataLoader

from qvlm.data.cache import DISK_MARGIN, FeatureCache, choose_features
from qvlm.data.images import BadSample, DataError, SkipCounter
from qvlm.data.records import load_records
from qvlm.data.stream import (
    StreamingBatches,
    StreamPosition,
    count_images,
    epoch_records,
    open_stream,
    shuffle_buffer,
    stage_samples,
)

COLOURS = ("red", "green", "blue", "yellow")


def png(i: int) -> bytes:
    buf = io.BytesIO()
    shape_image(COLOURS[i % 4], "square", seed=i, size=16).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, records: int, shards: int) -> str:
    """`records` (image, caption) samples in `shards` img2dataset-style tars; returns a brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-records // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(records, (s + 1) * per)):
                for ext, data in (("png", png(i)), ("txt", f"a {COLOURS[i % 4]} square {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def keys(records) -> list[str]:
    return [r.key for r in records]


def fake_features(record) -> dict:
    return {"features": torch.zeros(1, 1)}


def collate(items):
    items = [i for i in items if i is not None]
    return {"captions": [i["caption"] for i in items]} if items else {}


@pytest.mark.parametrize("shards,consumers", [(8, 3), (2, 5)])  # whole shards dealt / every n-th record
def test_consumers_split_every_epoch_exactly_once(tmp_path, shards, consumers):
    stream = open_stream(write_shards(tmp_path, 40, shards))
    everything = sorted(keys(epoch_records(stream, 0, 0, 0, 1)))
    assert len(everything) == 40
    for epoch in (0, 1):
        parts = [keys(epoch_records(stream, 0, epoch, c, consumers)) for c in range(consumers)]
        assert sorted(k for part in parts for k in part) == everything
        assert all(part for part in parts)
    assert keys(epoch_records(stream, 0, 0, 0, 1)) != keys(epoch_records(stream, 0, 1, 0, 1))  # reshuffled


def test_shuffle_buffer_keeps_everything_and_mixes_within_its_size():
    import random

    out = list(shuffle_buffer(range(1000), 50, random.Random(0)))
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert all(abs(v - i) < 1000 for i, v in enumerate(out))
    assert out[0] < 51  # the first draw can only come from what the buffer held


def test_dataloader_workers_and_ranks_see_each_caption_once_per_epoch(tmp_path):
    pattern = write_shards(tmp_path, 40, 8)
    seen = []
    for rank in range(2):
        stream = StreamingBatches(open_stream(pattern), 1, fake_features, collate, batch_size=5,
                                  buffer_size=7, rank=rank, world_size=2)
        position = StreamPosition()
        for batch in DataLoader(stream, batch_size=None, num_workers=2):
            epoch = batch["stream_position"][2]
            position.advance(batch)
            if epoch == 1:
                break
            seen += batch["captions"]
    assert sorted(seen) == sorted(f"a {COLOURS[i % 4]} square {i}" for i in range(40))


def _run(pattern: str, batches: int, state: StreamPosition | None = None, workers: int = 2):
    """Captions of the next `batches` batches and the position after them, as the trainer tracks it."""
    stream = StreamingBatches(open_stream(pattern), 1, fake_features, collate, batch_size=3, buffer_size=5,
                              seed=7)
    position = state or StreamPosition()
    stream.set_state(StreamPosition.from_json(json.loads(json.dumps(position.to_json()))))
    out = []
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        position.advance(batch)
        out.append(batch["captions"])
        if len(out) == batches:
            return out, position
    raise AssertionError("the stream ended")


@pytest.mark.parametrize("stop", [5, 8])  # odd and even batch counts, across an epoch end (40/3/2 workers)
def test_resume_mid_epoch_continues_with_the_same_batches(tmp_path, stop):
    pattern = write_shards(tmp_path, 40, 4)
    full, _ = _run(pattern, 16)
    first, position = _run(pattern, stop)
    assert position.batches == stop
    rest, _ = _run(pattern, 16 - stop, position)
    assert first + rest == full


def test_positions_of_all_processes_merge_to_each_readers_newest():
    """After a resume every process holds all readers' checkpointed positions; only its own move on."""
    rank0 = StreamPosition(17, {0: (3, 8), 1: (3, 4)}, 2)  # advanced reader 0; reader 1 as checkpointed
    rank1 = StreamPosition(17, {0: (3, 4), 1: (3, 8)}, 2)
    assert rank0.merged([rank0, rank1]).consumers == {0: (3, 8), 1: (3, 8)}
    assert StreamPosition(2, {0: (0, 6)}, 2).merged([StreamPosition(2, {1: (1, 0)}, 2)]).consumers == \
        {0: (0, 6), 1: (1, 0)}


def test_resume_refuses_another_worker_count(tmp_path):
    pattern = write_shards(tmp_path, 40, 4)
    _, position = _run(pattern, 3, workers=2)
    with pytest.raises(DataError, match="same number of processes and train.num_workers"):
        _run(pattern, 1, position, workers=0)


def test_too_few_samples_for_a_batch_is_an_error_not_a_hang(tmp_path):
    stream = StreamingBatches(open_stream(write_shards(tmp_path, 4, 1)), 1, fake_features, collate, batch_size=8)
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        next(iter(stream))


def _every_fourth_image_good(record) -> dict:
    if int(record.captions[0].rsplit(" ", 1)[1]) % 4:  # captions end in the record's index
        raise BadSample("corrupt", "test")
    return fake_features(record)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mostly_bad_stream_stops_with_the_counts_instead_of_training_on_scraps(tmp_path, workers):
    pattern = write_shards(tmp_path, 64, 2)  # each consumer needs a few epochs to judge: counted across them
    stream = StreamingBatches(open_stream(pattern), 1, _every_fourth_image_good, collate, batch_size=8,
                              max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"samples: \d+ used, \d+ skipped \(7[0-9]\.\d%: corrupt .*"
                                        r"train.max_bad_fraction"):
        for _ in stream.loader(collate, num_workers=workers):
            pass
    lenient = StreamingBatches(open_stream(pattern), 1, _every_fourth_image_good, collate, batch_size=8,
                               max_bad_fraction=0.8)
    trained = 0
    for batch in lenient.loader(collate):
        if batch["stream_position"][2] == 10:  # epoch 10 begins
            break
        trained += len(batch["captions"])
    assert trained == 10 * 16  # 75% skipped, every good sample of 10 epochs trained


def test_pipe_shards_imagefolder_and_hf_folder_stream_the_same_records(tmp_path):
    pattern = write_shards(tmp_path / "tars", 12, 3)
    piped = open_stream(f"pipe:cat {tmp_path}/tars/{{00000..00002}}.tar")
    assert [s.url for s in piped][0] == f"pipe:cat {tmp_path}/tars/00000.tar"
    by_tar = {r.key.split("/")[1]: r for r in epoch_records(open_stream(pattern), 0, 0, 0, 1)}
    by_pipe = {r.key.split("/")[1]: r for r in epoch_records(piped, 0, 0, 0, 1)}
    assert by_pipe.keys() == by_tar.keys() and all(by_pipe[k].image_bytes == by_tar[k].image_bytes for k in by_tar)

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for key, record in by_tar.items():
        (folder / f"{key}.png").write_bytes(record.image_bytes)
        rows.append({"file_name": f"{key}.png", "text": record.captions[0], "caption": record.captions[0]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_folder = list(epoch_records(open_stream(folder), 0, 0, 0, 1))
    assert sorted(r.captions[0] for r in from_folder) == sorted(r.captions[0] for r in by_tar.values())
    assert count_images(open_stream(folder)) == (12, True)
    assert len(load_records(folder)) == 12  # the list path reads imagefolders too
    assert count_images(open_stream(pattern)) == (12, True)
    assert count_images(piped) == (12, False)  # the first shard's 4 images × 3 shards

    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"img": [{"bytes": r.image_bytes, "path": None} for r in by_tar.values()],
                                     "caption": [r.captions[0] for r in by_tar.values()]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    hf.save_to_disk(str(tmp_path / "hf"))
    shards = open_stream(tmp_path / "hf")
    assert len(shards) == 12  # small tables still split into many row ranges
    parts = [list(epoch_records(shards, 0, 0, c, 4)) for c in range(4)]
    assert sorted(r.captions[0] for p in parts for r in p) == sorted(r.captions[0] for r in by_tar.values())


def test_a_failing_pipe_command_counts_a_bad_shard(tmp_path):
    from qvlm.data.images import SkipCounter

    skips = SkipCounter()
    assert list(epoch_records(open_stream("pipe:exit 3"), 0, 0, 0, 1, skips)) == []
    assert skips.skipped["bad_shard"] == 1


def test_hub_streaming_splits_by_data_shard_and_fails_clearly_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import qvlm.data.stream as stream_module

    rows = {"image": [{"bytes": png(i), "path": None} for i in range(8)], "caption": [f"c{i}" for i in range(8)]}
    table = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(),
                                                                          "caption": datasets.Value("string")}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: table.to_iterable_dataset(4))
    stream_module._hub_stream.cache_clear()
    shards = open_stream("someone/captions")
    assert len(shards) == 4
    parts = [list(epoch_records(shards, 0, 0, c, 2)) for c in range(2)]
    assert sorted(r.captions[0] for p in parts for r in p) == rows["caption"]

    # offline: in a fresh process, since huggingface_hub reads HF_HUB_OFFLINE when imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from qvlm.data.stream import open_stream; open_stream('nobody/nothing')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "DataError: could not stream the hub dataset 'nobody/nothing'" in run.stderr
    assert "save_to_disk('data/hub')" in run.stderr


class _Encoder:
    """A stand-in encoder: [B, 3, 8, 8] pixels -> [B, 4, 48] features."""

    cache_key = "test-encoder"
    device = torch.device("cpu")

    def preprocess(self, images):
        return torch.stack([torch.from_numpy(__import__("numpy").asarray(i.resize((8, 8)), dtype="float32"))
                            .permute(2, 0, 1) / 255 for i in images])

    def __call__(self, pixels):
        return pixels.reshape(len(pixels), 4, 48) * 3 + 1


def test_cache_plan_estimates_size_and_refuses_a_disk_too_small(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", _Encoder())
    plan = cache.plan(1000)
    assert plan.needed == 1000 * (2 * 4 * 48 + 128)  # fp16 [4, 48] + its index entry
    assert "1,000 images" in plan.describe() and plan.fits(DISK_MARGIN)
    import shutil as real_shutil

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr("qvlm.data.cache.shutil.disk_usage",
                        lambda path: usage._replace(free=plan.needed - 1))
    small = cache.plan(1000)
    assert not small.fits()
    with pytest.raises(DataError, match="cannot hold it.*train.features=online"):
        small.check()
    assert not cache.plan(1000).fits(DISK_MARGIN)
    assert os.listdir(tmp_path) == []  # sizing wrote nothing


def test_feature_mode_auto_says_which_and_why(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", _Encoder())
    roomy = cache.plan(1000)
    assert choose_features("auto", roomy)[0] == "cache" and "fits the free disk" in choose_features("auto", roomy)[1]
    assert choose_features("online", roomy)[0] == "online"
    tight = roomy.__class__(1000, True, roomy.needed, int(roomy.needed * 1.1), roomy.folder)  # fits, no margin
    assert choose_features("cache", tight)[0] == "cache"
    mode, why = choose_features("auto", tight)
    assert mode == "online" and "does not fit the free disk with a 25% margin" in why and "1,000 images" in why
    unknown = cache.plan(None)
    assert choose_features("auto", unknown)[0] == "online" and "cannot be estimated" in choose_features("auto", unknown)[1]


def test_online_features_equal_cached_ones(tmp_path, tiny_config):
    """The cache stores what the encoder computes online, rounded to fp16."""
    from qvlm.data.records import Record
    from qvlm.models.vision import FrozenVisionEncoder

    encoder = FrozenVisionEncoder.build(tiny_config.vision)
    records = [Record(key=str(i), image_bytes=png(i), captions=["c"]) for i in range(6)]
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.build(records, progress=False)
    cached = cache.get([r.content_hash() for r in records])
    with torch.inference_mode():
        online = encoder(encoder.preprocess([r.open_image() for r in records]))
    assert cached.shape == online.shape
    torch.testing.assert_close(cached, online.float(), rtol=2e-3, atol=2e-3)
    assert cache.bytes_per_image() == 2 * online[0].numel() + 128


def test_describe_first_in_a_stream_uses_the_records_own_caption(tmp_path):
    rows = [{"image": "0.png", "caption": "a red square.", "question": "is it red?", "answer": "yes"},
            {"image": "0.png", "question": "is it  blue?", "answer": "no"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_caption, alone = load_records(tmp_path / "d.jsonl")
    skips = SkipCounter("samples")
    question, caption = stage_samples(with_caption, 2, skips, describe_first=True)
    assert (question.text, question.description, question.is_question) == ("is it red?", "a red square.", True)
    assert (caption.text, caption.answer, caption.description) == ("a red square.", "a red square.", None)
    assert stage_samples(alone, 2, skips, describe_first=True)[0].description is None  # nothing to look up
    assert stage_samples(with_caption, 2, skips)[0].description is None  # off by default

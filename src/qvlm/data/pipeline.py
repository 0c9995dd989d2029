"""A training stage's data: a record list or a stream (`train.stream`), with features from the cache or
computed online (`train.features`); docs/data.md#streaming and #feature-cache."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from qvlm.data.cache import FeatureCache, choose_features, feature_cache_folder
from qvlm.data.images import BadSample, DataError, SkipCounter
from qvlm.data.records import Record, iter_unique_images, read_records
from qvlm.data.stream import StreamingBatches, count_images, epoch_records, open_stream


@dataclass
class CachedFeatures:
    """A record's features from the cache: {"features": [P, Dv]} (picklable for DataLoader workers)."""

    cache: FeatureCache

    def __call__(self, record: Record) -> dict:
        key = record.content_hash()
        if not self.cache.has(key):
            raise BadSample("not_cached", record.key)  # failed to decode while the cache was built
        return {"features": self.cache.get([key])[0]}


@dataclass
class Pixels:
    """A record's decoded, resized image: {"pixel_values": [3, H, W]}; the step encodes the batch."""

    encoder: Any  # FrozenVisionEncoder: only its preprocess runs here, in the DataLoader worker

    def __call__(self, record: Record) -> dict:
        return {"pixel_values": self.encoder.preprocess([record.open_image()])[0]}


@dataclass
class TrainingData:
    train_set: Dataset | StreamingBatches
    val_set: Dataset | None
    features: str  # "cache" | "online"

    @property
    def streaming(self) -> bool:
        return isinstance(self.train_set, StreamingBatches)


def training_data(config, stage: int, data: str, val: str | None, encoder, make: Callable[..., Dataset],
                  accelerator) -> TrainingData:
    """Decide where features come from, build the cache if they come from it (main process first), and
    make the datasets: `make(records, cache= | encoder=, skips=)` for lists, a `StreamingBatches` for
    `train.stream`. The validation set is small and read every evaluation: always cached."""
    cache = FeatureCache(feature_cache_folder(config.train.feature_cache), encoder)
    skips = SkipCounter("samples")  # malformed manifest lines count with the samples
    shards = open_stream(data) if config.train.stream else None
    records = None if shards else list(read_records(data, skips=skips))
    val_records = list(read_records(val)) if val else []
    if config.train.features == "online":  # no estimate needed: nothing of the training data is cached
        images, exact = None, False
    else:
        images, exact = count_images(shards) if shards else (_unique_images(records), True)
    mode, why = choose_features(config.train.features, cache.plan(images, exact))
    if mode == "online":
        # only the validation images get cached
        cache.plan(_unique_images(val_records)).check()
    accelerator.print(why)
    to_cache = val_records if mode == "online" else _all_records(shards, records, val_records)
    with accelerator.main_process_first():
        image_skips = cache.build(to_cache, progress=accelerator.is_main_process)
        cache.encoder = None  # reading needs no encoder; keeps DataLoader workers light
    accelerator.print(f"{cache.summary()}; {image_skips.summary()}")
    val_set = make(val_records, cache=cache) if val_records else None
    if shards:
        fields = CachedFeatures(cache) if mode == "cache" else Pixels(encoder)
        s = config.stage1 if stage == 1 else config.stage2
        stream = StreamingBatches(shards, stage, fields, None, s.batch_size, seed=config.train.seed,
                                  buffer_size=config.train.shuffle_buffer, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, skips=skips,
                                  max_bad_fraction=config.train.max_bad_fraction,
                                  describe_first=stage == 2 and config.lm.describe_first)
        return TrainingData(stream, val_set, mode)
    image = {"cache": cache} if mode == "cache" else {"encoder": encoder}
    train_set = make(records, **image, skips=skips)
    accelerator.print(f"training data: {skips.report()}")
    train_set.check(config.train.max_bad_fraction)
    return TrainingData(train_set, val_set, mode)


def _unique_images(records: list[Record]) -> int:
    return sum(1 for _ in iter_unique_images(records))


def _all_records(shards, records, val_records):
    """Every record to cache: the list's, or one pass over the whole stream (no split, no shuffle)."""
    if shards is None:
        return records + val_records
    return itertools.chain(epoch_records(shards, 0, 0, 0, 1), val_records)


def require_max_steps(max_steps: int | None, stage: int) -> int:
    """A stream has no length, so its schedule is drawn over stageN.max_steps."""
    if not max_steps:
        raise DataError(f"a stream (train.stream=true) has no length to count epochs in: set "
                        f"stage{stage}.max_steps, the number of optimizer steps to train")
    return max_steps

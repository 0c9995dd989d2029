"""Streaming training data: records read shard by shard, never held as a list (docs/data.md#streaming).

`open_stream(spec)` lists the shards of a source without reading them:
- WebDataset tars: local paths, brace patterns, globs, folders, `pipe:COMMAND` (one shard per tar);
- JSONL/CSV manifests and imagefolders (images + `metadata.jsonl`/`.csv`): one shard each;
- Hugging Face `datasets` `save_to_disk` folders: row ranges of the memory-mapped table;
- hub ids (`owner/name`): `datasets.load_dataset(..., streaming=True)`, one shard per data file.

`StreamingBatches` is the `IterableDataset` training reads (`DataLoader(batch_size=None)`). It works
like webdataset's pipeline: each consumer (process × DataLoader worker) reads its share of an epoch,
passes the samples through a shuffle buffer, decodes and batches them, and repeats epochs without end
(training stops at `max_steps`). Unlike webdataset it is exactly resumable: the order depends only on
(seed, epoch, consumer), every batch carries its consumer's position, and `set_state` replays the
draws up to it (reading the shards again, decoding nothing).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qvlm.data.images import DEFAULT_MAX_CAPTION_CHARS, BadSample, DataError, SkipCounter, clean_caption
from qvlm.data.prompts import CAPTION_PROMPTS, sample_caption_prompt, vqa_prompt
from qvlm.data.records import (
    IMAGE_EXTENSIONS,
    Record,
    _iter_tar,
    _looks_like_hub_id,
    _looks_like_shards,
    consumer_index,
    encoded_images,
    expand_shards,
    hf_rows_to_records,
    imagefolder_metadata,
    import_datasets,
    iter_unique_images,
    load_hf_folder,
    read_records,
)

HF_ROWS_PER_SHARD = 10_000
HF_MIN_SHARDS = 64  # small tables still split across many consumers


# ---------------------------------------------------------------------------------------------------
# Shards: small picklable descriptions, read inside each DataLoader worker


@dataclass(frozen=True)
class TarShard:
    url: str  # a path or `pipe:COMMAND`

    def records(self, skips: SkipCounter | None) -> Iterator[Record]:
        return _iter_tar(self.url, skips)

    def count_images(self) -> int | None:
        """Image members, read from the tar headers (seeking past the data); None for `pipe:`."""
        import tarfile

        if self.url.startswith("pipe:"):
            return None
        with tarfile.open(self.url, mode="r:*") as tar:
            return sum(1 for m in tar if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class FileShard:
    path: str  # a JSONL/CSV manifest (an imagefolder's metadata file too)

    def records(self, skips: SkipCounter | None) -> Iterator[Record]:
        return read_records(self.path, skips=skips)

    def count_images(self) -> int:
        return sum(1 for _ in iter_unique_images(read_records(self.path)))


@dataclass(frozen=True)
class HFRows:
    path: str  # a save_to_disk folder
    start: int
    stop: int

    def records(self, skips: SkipCounter | None) -> Iterator[Record]:
        rows = _hf_folder(self.path).select(range(self.start, self.stop))
        return hf_rows_to_records(rows, Path(self.path).name, skips=skips, first_row=self.start)

    def count_images(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HubShard:
    name: str  # a hub id, streamed
    split: str
    index: int
    count: int

    def records(self, skips: SkipCounter | None) -> Iterator[Record]:
        rows = _hub_stream(self.name, self.split).shard(num_shards=self.count, index=self.index)
        return hf_rows_to_records(rows, f"{self.name}[{self.index}]", skips=skips)

    def count_images(self) -> None:
        return None


Shard = TarShard | FileShard | HFRows | HubShard


@lru_cache(maxsize=4)
def _hf_folder(path: str) -> Any:
    return load_hf_folder(path)  # memory-mapped: once per process, shared by its shards


@lru_cache(maxsize=4)
def _hub_stream(name: str, split: str) -> Any:
    datasets = import_datasets(f"streaming the hub dataset {name}")
    try:
        return encoded_images(datasets.load_dataset(name, split=split, streaming=True))
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"could not stream the hub dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Streaming needs the Hugging Face hub; offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no "
            "network), save it once where the hub is reachable: python -c \"import datasets; "
            f"datasets.load_dataset('{name}', split='{split}').save_to_disk('data/hub')\" and pass "
            "--data data/hub") from e


def open_stream(spec: str | Path, split: str = "train") -> list[Shard]:
    """The shards of a data source, in order (see module doc); nothing is read yet."""
    spec = str(spec)
    path = Path(spec)
    if _looks_like_shards(spec):
        return [TarShard(url) for url in expand_shards(spec)]
    if not path.exists():
        if _looks_like_hub_id(spec):
            ds = _hub_stream(spec, split)
            return [HubShard(spec, split, i, ds.num_shards) for i in range(ds.num_shards)]
        raise DataError(f"dataset not found: {spec}")
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            rows = len(_hf_folder(spec))
            size = max(1, min(HF_ROWS_PER_SHARD, math.ceil(rows / HF_MIN_SHARDS)))
            return [HFRows(spec, start, min(rows, start + size)) for start in range(0, rows, size)]
        metadata = imagefolder_metadata(path)
        if metadata is not None:
            return [FileShard(str(metadata))]
        return [TarShard(url) for url in expand_shards(spec)]
    return [FileShard(spec)]


def count_images(shards: list[Shard]) -> tuple[int | None, bool]:
    """(number of images, exact?) for a cache size estimate; unknown (None) for hub streams. `pipe:`
    shards count the first one's images times the number of shards."""
    first = shards[0].count_images() if shards else 0
    if first is None and isinstance(shards[0], TarShard):
        return _count_piped(shards[0]) * len(shards), False
    if first is None:
        return None, False
    return first + sum(shard.count_images() for shard in shards[1:]), True


def _count_piped(shard: TarShard) -> int:
    return sum(1 for _ in shard.records(None))


def epoch_records(shards: list[Shard], seed: int, epoch: int, consumer: int, consumers: int,
                  skips: SkipCounter | None = None) -> Iterator[Record]:
    """This consumer's share of one epoch: the shards in an order drawn from (seed, epoch), dealt round
    robin; with fewer shards than consumers, every consumer reads them all and keeps every n-th record.
    Either way the consumers' shares partition the epoch."""
    order = list(range(len(shards)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if len(shards) >= consumers:
        for i in order[consumer::consumers]:
            yield from shards[i].records(skips)
        return
    chained = (record for i in order for record in shards[i].records(skips if consumer == 0 else None))
    yield from itertools.islice(chained, consumer, None, consumers)


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Yield `items` in random order, holding at most `size` of them (webdataset's `shuffle`)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------------------------------
# Samples of each stage (the streaming twins of datasets.CaptionDataset / InstructionDataset)


@dataclass
class Sample:
    """One training sample before its image is decoded."""

    record: Record
    text: str  # the caption, or the VQA prompt
    answer: str | None = None
    answers: tuple[str, ...] = ()
    answer_type: str | None = None
    is_question: bool = False
    description: str | None = None  # `lm.describe_first`: the record's own first caption


def stage_samples(record: Record, stage: int, skips: SkipCounter,
                  max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, describe_first: bool = False) -> list[Sample]:
    """Stage 1: one sample per caption. Stage 2: one per caption (answer = caption) and one for the
    question (answer = the most common answer), behind the record's first caption with `describe_first`
    (a stream cannot look up other records of the same image). Bad captions / empty questions are
    counted and dropped."""
    samples = []
    for text in record.captions:
        try:
            caption = clean_caption(text, max_caption_chars)
        except BadSample as e:
            skips.record(e, record.key)
            continue
        samples.append(Sample(record, caption, answer=caption if stage == 2 else None))
    if stage == 2 and record.is_vqa:
        answer = record.best_answer()
        if record.question.strip() and answer and answer.strip():
            description = samples[0].text if describe_first and samples else None
            samples.insert(0, Sample(record, vqa_prompt(record.question), " ".join(answer.split()),
                                     tuple(record.answers), record.answer_type, is_question=True,
                                     description=description))
        else:
            skips.skip("empty_qa", record.key)
    return samples


@dataclass
class StreamPosition:
    """How far a run has read its stream: the batches taken, and each consumer's (epoch, samples drawn)
    after its latest batch. Saved in checkpoints as JSON (`to_json`)."""

    batches: int = 0
    consumers: dict[int, tuple[int, int]] = field(default_factory=dict)
    count: int | None = None  # consumers (processes × DataLoader workers) of the run that read it

    def advance(self, batch: dict) -> None:
        """Account for a batch taken from the DataLoader (removes its `stream_position`)."""
        consumer, count, epoch, drawn = batch.pop("stream_position")
        self.batches += 1
        self.count = count
        self.consumers[consumer] = (epoch, drawn)

    @property
    def epoch(self) -> int:
        """The epoch the slowest consumer is in (whole epochs done by every consumer)."""
        return min((e for e, _ in self.consumers.values()), default=0)

    def merged(self, others: Iterable[StreamPosition]) -> StreamPosition:
        """This process's position joined with the other processes'. Each reader's newest position wins:
        after a resume every process also holds the other processes' readers at the checkpoint."""
        joined = StreamPosition(self.batches, dict(self.consumers), self.count)
        for other in others:
            for consumer, position in other.consumers.items():
                joined.consumers[consumer] = max(joined.consumers.get(consumer, position), position)
        return joined

    def to_json(self) -> dict:
        return {"batches": self.batches, "count": self.count,
                "consumers": {str(c): list(v) for c, v in sorted(self.consumers.items())}}

    @classmethod
    def from_json(cls, data: dict | None) -> StreamPosition:
        if not data:
            return cls()
        return cls(int(data["batches"]), {int(c): (int(e), int(n)) for c, (e, n) in data["consumers"].items()},
                   data.get("count"))


class StreamingBatches(IterableDataset):
    """Collated training batches from a stream of shards, for `DataLoader(stream, batch_size=None)`.

    `image_fields(record)` gives `{"features": [P, Dv]}` (feature cache) or `{"pixel_values": [3, H, W]}`
    (online), or raises `BadSample`; `collate` is the stage's collator (or given to `loader`). Each batch also holds
    `stream_position`: `[consumer, consumers, epoch, samples drawn]` after it (`StreamPosition.advance`). A consumer's last samples of an
    epoch that do not fill a batch are dropped (as `drop_last`). Bad samples are skipped and counted by
    each consumer; once a consumer has seen `JUDGE_AFTER` samples, a bad share above `max_bad_fraction`
    stops training with the counts (a stream is never read whole up front, so this is where it is checked).
    """

    JUDGE_AFTER = 200  # samples a consumer reads before its bad share is trusted

    def __init__(self, shards: list[Shard], stage: int, image_fields: Callable[[Record], dict],
                 collate: Callable[[list], dict] | None, batch_size: int, seed: int = 0, buffer_size: int = 1000,
                 caption_prompts: list[str] | None = None, rank: int | None = None, world_size: int | None = None,
                 skips: SkipCounter | None = None, max_bad_fraction: float = 1.0, describe_first: bool = False):
        super().__init__()
        if not shards:
            raise DataError("the stream has no shards")
        self.shards, self.stage = shards, stage
        self.image_fields, self.collate = image_fields, collate
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, max(1, buffer_size)
        self.caption_prompts = list(caption_prompts or CAPTION_PROMPTS)
        self.rank, self.world_size = rank, world_size
        self.skips = skips if skips is not None else SkipCounter("samples")
        self.max_bad_fraction = max_bad_fraction
        self.describe_first = describe_first
        self.state = StreamPosition()

    def loader(self, collate: Callable[[list], dict], num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
        """The DataLoader training reads: batches made (decoded, collated) in `num_workers` workers."""
        self.collate = collate
        return DataLoader(self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)

    def set_state(self, state: StreamPosition) -> None:
        """Start each consumer where a checkpointed run left it."""
        self.state = state

    def samples(self, epoch: int, consumer: int, consumers: int) -> Iterator[Sample]:
        """This consumer's samples of `epoch`, shuffled: a pure function of its arguments and the seed."""
        records = epoch_records(self.shards, self.seed, epoch, consumer, consumers, self.skips)
        expanded = (s for record in records
                    for s in stage_samples(record, self.stage, self.skips, describe_first=self.describe_first))
        return shuffle_buffer(expanded, self.buffer_size, random.Random(hash((self.seed, epoch, consumer))))

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers = self._consumer()
        epoch, drawn = self.state.consumers.get(consumer, (0, 0))
        while True:
            yield from self._epoch(consumer, consumers, epoch, drawn)
            epoch, drawn = epoch + 1, 0

    def _consumer(self) -> tuple[int, int]:
        """(consumer, consumers). The DataLoader takes batches from its workers round robin, starting at
        worker 0; after a resume at batch B, worker w plays consumer (w + B) mod workers, so the batches
        come in the order the uninterrupted run had."""
        index, count = consumer_index(self.rank, self.world_size)
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        rank, worker = divmod(index, workers)
        if self.state.count not in (None, count):
            raise DataError(f"this stream was checkpointed with {self.state.count} consumers (processes × "
                            f"train.num_workers) and now has {count}: resume with the same number of "
                            "processes and train.num_workers")
        return rank * workers + (worker + self.state.batches) % workers, count

    def _epoch(self, consumer: int, consumers: int, epoch: int, start: int) -> Iterator[dict]:
        """The batches of one epoch after its first `start` samples (replayed, not decoded)."""
        chunk: list[Sample] = []
        drawn = start
        samples = itertools.islice(self.samples(epoch, consumer, consumers), start, None)
        for drawn, sample in enumerate(samples, start=start + 1):
            chunk.append(sample)
            if len(chunk) == self.batch_size:
                batch = self._batch(chunk, consumer, epoch, drawn)
                chunk = []
                if batch:
                    yield {**batch, "stream_position": [consumer, consumers, epoch, drawn]}
        if drawn < self.batch_size:  # no batch in this epoch, nor in any: it would spin for ever
            raise DataError(f"stream consumer {consumer} of {consumers} (processes × train.num_workers) got "
                            f"{drawn} samples in epoch {epoch}, fewer than batch_size={self.batch_size}: use "
                            "fewer workers or processes, a smaller batch, or more shards")

    def _batch(self, chunk: list[Sample], consumer: int, epoch: int, drawn: int) -> dict:
        """Decode and collate; samples whose image fails are dropped (an empty batch gives {})."""
        first = drawn - len(chunk)
        items = [self._item(sample, (self.seed, consumer, epoch, first + i)) for i, sample in enumerate(chunk)]
        if self.skips.total >= self.JUDGE_AFTER:  # counted across epochs: an all-bad stream stops, never spins
            self.skips.check(self.max_bad_fraction)
        return self.collate(items)

    def _item(self, sample: Sample, where: tuple[int, ...]) -> dict | None:
        try:
            fields = self.image_fields(sample.record)
            key = sample.record.content_hash()
        except BadSample as e:
            self.skips.record(e, sample.record.key)
            return None
        self.skips.ok()
        if self.stage == 1:
            return {**fields, "caption": sample.text, "image_key": key}
        if sample.is_question:
            user_text, prompt = sample.text, vqa_prompt(sample.text, sample.description)
        else:  # a caption's prompt is drawn per (seed, consumer, epoch, position)
            user_text = prompt = sample_caption_prompt(random.Random(hash(where)), self.caption_prompts)
        return {**fields, "prompt": prompt, "user_text": user_text,
                "description": sample.description if sample.is_question else None, "answer": sample.answer,
                "answers": list(sample.answers) or [sample.answer], "answer_type": sample.answer_type,
                "image_key": key}

"""On-disk cache of frozen-encoder patch features: the vision encoder runs once per image, ever.

Layout (one folder per encoder configuration, so a new model id, input size or arithmetic starts a new cache):

    ROOT/<sha256(encoder.cache_key)[:16]>/
        encoder.json                  {"cache_key": "..."}                      (what built it)
        index.json                    {"shape": [P, Dv], "entries": {sha256: [shard, row]}}
        shard-000000.safetensors      "features": fp16 [N, P, Dv]; metadata "keys": JSON list of sha256

An image's key is the sha256 of its encoded file bytes, so renamed or copied files hit, and edited
ones miss. Every file is written to a temporary name and renamed into place: an interrupted build
leaves complete shards only. The index can always be rebuilt from the shards' own key lists, so a
crash between writing a shard and updating the index loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from qvlm import console
from qvlm.data.images import DEFAULT_MAX_PIXELS, BadSample, DataError, SkipCounter
from qvlm.data.records import Record
from qvlm.utils import cache_home


def feature_cache_folder(feature_cache: str | None) -> Path:
    """Where patch features live: `train.feature_cache`, else `$QVLM_CACHE/features`. Training writes
    there, and evaluation and search read there by default, so no image is encoded twice."""
    return Path(feature_cache) if feature_cache else cache_home() / "features"


class VisionEncoder(Protocol):
    """What the cache needs from `qvlm.models.vision.FrozenVisionEncoder`."""

    cache_key: str  # model id + input size (+ anything else that changes the features)
    device: torch.device

    def preprocess(self, images: list) -> torch.Tensor: ...  # PIL images → [B, 3, H, W]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...  # → [B, P, Dv]


class FeatureCache:
    """Patch features `[P, Dv]` per image content hash, for one encoder configuration."""

    def __init__(self, root: str | Path, encoder: VisionEncoder | None = None, cache_key: str | None = None,
                 shard_size: int = 1024, max_pixels: int = DEFAULT_MAX_PIXELS):
        """`encoder` is needed to build; reading needs only its `cache_key` (pass `cache_key` alone)."""
        if encoder is None and cache_key is None:
            raise ValueError("FeatureCache needs an encoder or a cache_key")
        self.encoder = encoder
        self.cache_key = cache_key if cache_key is not None else encoder.cache_key
        self.root = Path(root)
        self.dir = self.root / hashlib.sha256(self.cache_key.encode()).hexdigest()[:16]
        self.shard_size = shard_size
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
        self.skips = SkipCounter("images")
        self._entries: dict[str, tuple[str, int]] = {}
        self._shape: list[int] | None = None
        self._handles: dict[str, Any] = {}
        self._load_index()

    # -- index ----------------------------------------------------------------------------------

    def _load_index(self) -> None:
        self._entries, self._shape = {}, None
        self._handles.clear()
        index_path = self.dir / "index.json"
        if index_path.exists():
            data = json.loads(index_path.read_text())
            self._entries = {k: (v[0], int(v[1])) for k, v in data["entries"].items()}
            self._shape = data.get("shape")
        indexed = {shard for shard, _ in self._entries.values()}
        for shard in sorted(self.dir.glob("shard-*.safetensors")) if self.dir.exists() else []:
            if shard.name not in indexed:  # written just before an interruption: recover its keys
                self._adopt_shard(shard)

    def _adopt_shard(self, shard: Path) -> None:
        with safe_open(str(shard), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            self._shape = list(f.get_slice("features").get_shape()[1:])
        for row, key in enumerate(keys):
            self._entries.setdefault(key, (shard.name, row))

    def _write_index(self) -> None:
        data = {"cache_key": self.cache_key, "shape": self._shape,
                "entries": {k: [s, r] for k, s_r in sorted(self._entries.items()) for s, r in [s_r]}}
        _atomic_write(self.dir / "index.json", json.dumps(data).encode())

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def has(self, key: str) -> bool:
        return key in self._entries

    def key_of(self, record: Record) -> str:
        """The cache key of a record's image (sha256 of the file bytes); raises `BadSample`."""
        return record.content_hash()

    def get(self, keys: list[str]) -> torch.Tensor:
        """Features of `keys` as float32 `[B, P, Dv]`; `KeyError` for an image not in the cache."""
        rows = []
        for key in keys:
            if key not in self._entries:
                self.misses += 1
                raise KeyError(f"image {key[:12]}… is not in the feature cache {self.dir}")
            self.hits += 1
            shard, row = self._entries[key]
            rows.append(self._handle(shard).get_slice("features")[row:row + 1])
        return torch.cat(rows).float()

    def _handle(self, shard: str) -> Any:
        # Opened lazily per process (DataLoader workers each open their own, memory-mapped).
        handle = self._handles.get(shard)
        if handle is None or handle[0] != os.getpid():
            handle = (os.getpid(), safe_open(str(self.dir / shard), framework="pt"))
            self._handles[shard] = handle
        return handle[1]

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: drop open file handles
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["encoder"] = None
        return state

    @property
    def stats(self) -> dict[str, Any]:
        """Entries, size on disk, and hits/misses/hit rate over builds and reads of this object."""
        size = sum(p.stat().st_size for p in self.dir.glob("*")) if self.dir.exists() else 0
        looked_up = self.hits + self.misses
        return {"dir": str(self.dir), "images": len(self._entries), "bytes": size, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / looked_up if looked_up else 0.0}

    def summary(self) -> str:
        s = self.stats
        return (f"feature cache {s['dir']}: {s['images']} images, {s['bytes'] / 2**20:.1f} MiB, "
                f"{s['hits']} hits / {s['misses']} misses (hit rate {100 * s['hit_rate']:.1f}%)")

    # -- size and disk space ---------------------------------------------------------------------

    def bytes_per_image(self) -> int:
        """Disk bytes one image adds: fp16 features `[P, Dv]` plus its index entry. The shape comes from
        the cache, else from encoding one blank image."""
        if self._shape is None:
            if self.encoder is None:
                raise DataError("sizing the feature cache needs the vision encoder")
            from PIL import Image

            with torch.inference_mode():
                features = self.encoder(self.encoder.preprocess([Image.new("RGB", (64, 64))]).to(self.encoder.device))
            self._shape = list((features[0] if isinstance(features, (tuple, list)) else features).shape[1:])
        return 2 * math.prod(self._shape) + INDEX_BYTES_PER_IMAGE

    def plan(self, images: int | None, exact: bool = True) -> CachePlan:
        """What caching `images` images would take (beyond the images already cached) and the disk free."""
        folder = self.root
        while not folder.exists():  # the cache root may not exist yet: measure the disk it will be on
            folder = folder.parent
        needed = None if images is None else max(0, images - len(self)) * self.bytes_per_image()
        return CachePlan(images, exact, needed, shutil.disk_usage(folder).free, str(self.dir))

    # -- building -------------------------------------------------------------------------------

    def build(self, records: Iterable[Record], batch_size: int = 64, progress: bool = True) -> SkipCounter:
        """Encode every image of `records` that is not cached yet; return the pass's skip counts.

        Bad images are skipped and counted (`self.skips` accumulates over builds). Safe to run from
        several processes at once: a file lock serialises them and the later ones just hit.
        """
        if self.encoder is None:
            raise DataError("building the feature cache needs the vision encoder")
        self.dir.mkdir(parents=True, exist_ok=True)
        skips = SkipCounter("images")
        with FileLock(str(self.dir / ".lock")):
            for stale in self.dir.glob(".*.tmp"):  # left by a build that was killed mid-write
                stale.unlink(missing_ok=True)
            _atomic_write(self.dir / "encoder.json", json.dumps({"cache_key": self.cache_key}).encode())
            self._load_index()  # another process may have added shards
            _Builder(self, batch_size, skips, progress).run(records)
        self.skips.merge(skips)
        return skips

    def _write_shard(self, keys: list[str], features: torch.Tensor) -> None:
        """features: fp16 `[N, P, Dv]`, one row per key."""
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.safetensors")]
        name = f"shard-{max(existing, default=-1) + 1:06d}.safetensors"
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        save_file({"features": features.contiguous()}, str(tmp), metadata={"keys": json.dumps(keys)})
        os.replace(tmp, self.dir / name)
        for row, key in enumerate(keys):
            self._entries[key] = (name, row)
        self._shape = list(features.shape[1:])
        self._write_index()


INDEX_BYTES_PER_IMAGE = 128  # its index.json entry: sha256 + shard name + row
DISK_MARGIN = 1.25  # `auto` caches only when the estimate × this fits the free disk (checkpoints, logs)


@dataclass
class CachePlan:
    """A feature cache's estimated growth against the free disk (`FeatureCache.plan`)."""

    images: int | None  # images to cache; None: unknown (a hub stream)
    exact: bool  # False: extrapolated (e.g. from the first `pipe:` shard)
    needed: int | None  # bytes the build would add
    free: int  # bytes free on the cache's disk
    folder: str

    def fits(self, margin: float = 1.0) -> bool:
        return self.needed is not None and self.needed * margin <= self.free

    def describe(self) -> str:
        if self.needed is None:
            return f"feature cache {self.folder}: size unknown (the number of images is unknown)"
        about = "" if self.exact else "about "
        return (f"feature cache {self.folder}: {about}{self.images:,} images, estimated {_gib(self.needed)} to add; "
                f"{_gib(self.free)} free on its disk")

    def check(self) -> None:
        """Raise `DataError` when the disk cannot hold the cache (unknown sizes cannot be checked)."""
        if self.needed is not None and not self.fits():
            raise DataError(f"{self.describe()}: the disk cannot hold it. Free space, point "
                            "train.feature_cache at a larger disk, or encode on the fly with "
                            "--set train.features=online")


def choose_features(mode: str, plan: CachePlan) -> tuple[str, str]:
    """`train.features` resolved to "cache" or "online", with the reason to print.

    "cache" refuses (`DataError`) when the estimate exceeds the free disk; "auto" takes the cache only
    when the estimate × `DISK_MARGIN` fits (checkpoints and logs need room too), else encodes online.
    """
    if mode == "online":
        return "online", "features: online (train.features=online): the encoder runs on each batch in the step"
    if mode == "cache":
        plan.check()
        return "cache", f"features: cache (train.features=cache); {plan.describe()}"
    if plan.fits(DISK_MARGIN):
        return "cache", (f"features: cache (train.features=auto: the estimate fits the free disk with a "
                         f"{DISK_MARGIN - 1:.0%} margin); {plan.describe()}")
    why = "its size cannot be estimated" if plan.needed is None else \
        f"the estimate does not fit the free disk with a {DISK_MARGIN - 1:.0%} margin"
    return "online", (f"features: online (train.features=auto: {why}; the encoder runs on each batch in the "
                      f"step); {plan.describe()}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class _Builder:
    """One `FeatureCache.build` pass: decode → batch → encode → buffer → shard."""

    def __init__(self, cache: FeatureCache, batch_size: int, skips: SkipCounter, progress: bool):
        self.cache, self.batch_size, self.skips, self.progress = cache, batch_size, skips, progress
        self.batch_keys: list[str] = []
        self.batch_images: list = []
        self.pending_keys: list[str] = []
        self.pending: list[torch.Tensor] = []
        self.seen: set[str] = set()
        self.encoded = 0
        self.bar = None  # the pass's progress bar, while `run` runs

    def run(self, records: Iterable[Record]) -> None:
        total = len(records) if hasattr(records, "__len__") else None
        # Counts samples (cached ones fly by); the postfix counts the images the encoder ran on.
        with console.progress(total=total, desc="feature cache", unit="sample", disable=not self.progress) as bar:
            self.bar = bar
            for record in records:
                self.add(record)
                self.bar.update(1)
            self.encode_batch()
            self.flush()

    def add(self, record: Record) -> None:
        cache = self.cache
        try:
            key = cache.key_of(record)
        except BadSample as e:
            self.skips.record(e, record.key)
            return
        if key in self.seen or key in cache._entries:  # several records (questions) share an image
            if key not in self.seen:
                cache.hits += 1
                self.seen.add(key)
                self.skips.ok()
            return
        self.seen.add(key)
        try:
            image = record.open_image(cache.max_pixels)
        except BadSample as e:
            self.skips.record(e, record.key)
            return
        cache.misses += 1
        self.skips.ok()
        self.batch_keys.append(key)
        self.batch_images.append(image)
        if len(self.batch_images) >= self.batch_size:
            self.encode_batch()

    def encode_batch(self) -> None:
        if not self.batch_images:
            return
        encoder = self.cache.encoder
        with torch.inference_mode():
            pixels = encoder.preprocess(self.batch_images).to(encoder.device)
            features = encoder(pixels)
        if isinstance(features, (tuple, list)):
            features = features[0]
        self.pending.append(features.detach().to("cpu", torch.float16))
        self.pending_keys.extend(self.batch_keys)
        self.encoded += len(self.batch_keys)
        self.batch_keys, self.batch_images = [], []
        self.bar.set_postfix(encoded=self.encoded, refresh=False)
        if len(self.pending_keys) >= self.cache.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending_keys:
            return
        features = torch.cat(self.pending)
        for start in range(0, len(self.pending_keys), self.cache.shard_size):
            end = start + self.cache.shard_size
            self.cache._write_shard(self.pending_keys[start:end], features[start:end].clone())
        self.pending_keys, self.pending = [], []


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

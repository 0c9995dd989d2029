"""Robust image decoding and caption checks, with per-reason skip counting (docs/design.md#data-formats).

Bad data never stops a run: a sample that cannot be used raises `BadSample(reason)`, the caller skips
it and counts it in a `SkipCounter`. But a dataset that is mostly garbage must not train silently:
`SkipCounter.check(max_bad_fraction)` raises `DataError` past the configured share.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qvlm.errors import QVLMError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000×8000; anything larger is a decompression bomb for our purposes
DEFAULT_MAX_CAPTION_CHARS = 1000


class DataError(QVLMError):
    """The dataset as a whole is unusable (unreadable manifest, too many bad samples, ...)."""


class BadSample(QVLMError):
    """One sample cannot be used; `reason` is a short tag such as "missing", "corrupt", "too_large"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


ImageSource = str | Path | bytes


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               shrink_to: int | None = None) -> Image.Image:
    """Decode `source` (a path or the encoded bytes) into an RGB image, or raise `BadSample`.

    Transparency is composited on white; 16-bit and float modes are rescaled, not clipped; EXIF
    orientation is applied so that captions match what a person sees. With `shrink_to` (the encoder's
    input side), a larger image is scaled down right after decoding to a short side of 2 × shrink_to
    (JPEG decodes at reduced scale directly): the colour conversions then run on the small image, so
    a server holds a few MB per image instead of hundreds (a 5000×5000 PNG).
    """
    data = _read_bytes(source)
    # Our own pixel check below is the limit; PIL's global one must not be stricter than it.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.width * img.height > max_pixels:
                raise BadSample("too_large", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
            if shrink_to:
                img.draft(None, (2 * shrink_to, 2 * shrink_to))  # JPEG: decode at 1/2..1/8 scale
            img.load()
            if shrink_to:
                img = _shrink(img, 2 * shrink_to)
            img = ImageOps.exif_transpose(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise BadSample("corrupt", "not a recognised image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's decoders raise all of these
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadSample(reason, str(e)) from e
    if img.width == 0 or img.height == 0:
        raise BadSample("corrupt", "zero-sized image")
    return to_rgb(img)


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    """Box-filter `img` down to `short_side` on its shorter side (aspect kept); smaller images unchanged.
    The 2× margin over the encoder's side keeps the encoder's own bicubic resize doing the final step,
    as PIL's `reducing_gap` does."""
    scale = short_side / min(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BOX)


def _read_bytes(source: ImageSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as e:
            raise BadSample("missing", str(source)) from e
        except OSError as e:  # a directory, permission denied, I/O error
            raise BadSample("unreadable", f"{source}: {e}") from e
    if not data:
        raise BadSample("corrupt", "empty file")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB with the colours a viewer would show."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return _rescale_wide(img)
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, ...


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    # Transparent pixels often hold black (or junk) colour; dropping alpha would show it.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _rescale_wide(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images → 8-bit RGB (PIL's convert would clip at 255)."""
    # A writable copy, scaled in place: float32 is exact for 16-bit values and half of float64's memory.
    arr = np.array(img, dtype=np.float32)
    if img.mode.startswith("I;16"):
        arr /= 257.0  # 0..65535 → 0..255
    elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr *= 255.0  # float images in [0, 1]
    elif arr.size and arr.min() >= 0 and arr.max() <= 255:
        pass
    elif arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr /= 257.0  # 16-bit PNGs open as mode "I"
    else:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        arr -= lo
        arr *= 255.0 / max(hi - lo, 1e-12)
    grey = np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def clean_caption(text: object, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> str:
    """Collapse whitespace; raise `BadSample` for empty, non-text or overlong captions."""
    if not isinstance(text, str):
        raise BadSample("empty_caption" if text is None else "bad_caption", repr(text)[:80])
    cleaned = " ".join(text.split())
    if not cleaned:
        raise BadSample("empty_caption")
    if len(cleaned) > max_chars:
        raise BadSample("long_caption", f"{len(cleaned)} > {max_chars} characters")
    return cleaned


class SkipCounter:
    """Counts used and skipped samples per reason; one per pass over a dataset.

    Counts live in the process that made them: with DataLoader workers, count during a
    single-process pass (cache build, dataset construction), which is where this codebase does it.
    """

    def __init__(self, what: str = "samples", examples_per_reason: int = 3):
        self.what = what
        self.used = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._examples_per_reason = examples_per_reason

    def ok(self, n: int = 1) -> None:
        self.used += n

    def skip(self, reason: str, key: str | None = None) -> None:
        self.skipped[reason] += 1
        if key is not None:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self._examples_per_reason:
                shown.append(key)

    def record(self, error: BadSample, key: str | None = None) -> None:
        self.skip(error.reason, key)

    @property
    def total(self) -> int:
        return self.used + sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / self.total if self.total else 0.0

    def merge(self, other: SkipCounter) -> None:
        self.used += other.used
        self.skipped.update(other.skipped)
        for reason, keys in other.examples.items():
            shown = self.examples.setdefault(reason, [])
            shown.extend(keys[: max(0, self._examples_per_reason - len(shown))])

    def summary(self) -> str:
        """One line, e.g. "1000 samples: 990 used, 10 skipped (1.0%: missing 7, corrupt 3)"."""
        bad = sum(self.skipped.values())
        if not bad:
            return f"{self.total} {self.what}: all used"
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
        return (f"{self.total} {self.what}: {self.used} used, {bad} skipped "
                f"({100 * self.bad_fraction:.1f}%: {reasons})")

    def report(self) -> str:
        """`summary()` plus the first skipped keys of each reason (manifest lines say where and why)."""
        examples = "; ".join(f"{r}: {', '.join(k)}" for r, k in self.examples.items() if k)
        return f"{self.summary()}{f' — e.g. {examples}' if examples else ''}"

    def check(self, max_bad_fraction: float = 0.05) -> None:
        """Raise `DataError` when more than `max_bad_fraction` of the samples were skipped."""
        if self.total and self.bad_fraction > max_bad_fraction:
            raise DataError(f"{self.report()} — more than the allowed {100 * max_bad_fraction:.1f}% "
                            "(train.max_bad_fraction); check the data")

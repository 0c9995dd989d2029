"""Robust decoding: every bad-input kind is skipped and counted, odd modes convert with true colours."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qvlm.data.images import BadSample, DataError, SkipCounter, clean_caption, load_image
from qvlm.errors import QVLMError


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def reason(source, **kw) -> str:
    with pytest.raises(BadSample) as e:
        load_image(source, **kw)
    return e.value.reason


def test_bad_inputs_have_reasons(tmp_path):
    assert reason(tmp_path / "nope.jpg") == "missing"
    assert reason(b"this is not an image") == "corrupt"
    assert reason(b"") == "corrupt"
    jpeg = png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    png = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    assert reason(png[: len(png) // 2]) in ("truncated", "corrupt")
    corrupt = bytearray(png)
    corrupt[60:400] = b"\x00" * 340
    assert reason(bytes(corrupt)) in ("corrupt", "truncated")


def test_decompression_bomb_is_refused_before_decoding():
    big = png_bytes(Image.new("L", (3000, 3000)))  # compresses to a few KB: a small bomb
    assert reason(big, max_pixels=1_000_000) == "too_large"
    assert load_image(big, max_pixels=10_000_000).size == (3000, 3000)


def rgb_at(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    out = load_image(png_bytes(img) if img.mode != "CMYK" else png_bytes(img, "JPEG"))
    assert out.mode == "RGB"
    return out.getpixel(xy)


def test_modes_convert_with_correct_colours():
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    assert rgb_at(pal) == (255, 0, 0)
    # Transparent pixels holding black must show the white background, not black.
    assert rgb_at(Image.new("RGBA", (4, 4), (0, 0, 0, 0))) == (255, 255, 255)
    assert rgb_at(Image.new("RGBA", (4, 4), (0, 0, 255, 255))) == (0, 0, 255)
    half = rgb_at(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert all(abs(c - 127) <= 1 for c in half)
    assert rgb_at(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)
    tpal = Image.new("P", (4, 4))
    tpal.putpalette([0, 0, 0] * 256)
    tpal.info["transparency"] = 0
    assert rgb_at(tpal) == (255, 255, 255)
    cmyk = rgb_at(Image.new("CMYK", (16, 16), (0, 255, 255, 0)))  # pure red in CMYK, through JPEG
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60


def test_wide_modes_are_rescaled_not_clipped():
    arr16 = np.full((4, 4), 32768, np.uint16)  # mid grey in 16 bits
    grey16 = load_image(png_bytes(Image.fromarray(arr16)))  # PNG 16-bit opens as I or I;16
    assert abs(grey16.getpixel((0, 0))[0] - 128) <= 1
    from qvlm.data.images import to_rgb

    assert abs(to_rgb(Image.frombytes("I;16", (4, 4), arr16.tobytes())).getpixel((0, 0))[0] - 128) <= 1
    assert to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32))).getpixel((0, 0)) == (128,) * 3
    assert to_rgb(Image.fromarray(np.full((4, 4), 200, np.int32))).getpixel((0, 0)) == (200,) * 3


def test_captions_empty_or_huge_are_bad():
    assert clean_caption("  a  dog\n running ") == "a dog running"
    for text, why in [("", "empty_caption"), ("   ", "empty_caption"), (None, "empty_caption"),
                      ("x" * 50, "long_caption")]:
        with pytest.raises(BadSample) as e:
            clean_caption(text, max_chars=20)
        assert e.value.reason == why


def test_skip_counter_summary_and_threshold():
    skips = SkipCounter()
    skips.ok(95)
    for _ in range(3):
        skips.skip("missing", "a.jpg")
    skips.skip("corrupt", "b.jpg")
    assert skips.total == 99 and "4 skipped" in skips.summary() and "missing 3" in skips.summary()
    skips.check(0.05)  # 4% is allowed
    skips.skip("corrupt", "c.jpg")
    skips.skip("corrupt", "d.jpg")
    with pytest.raises(DataError, match="max_bad_fraction") as e:
        skips.check(0.05)
    assert isinstance(e.value, QVLMError) and "\n" not in str(e.value)

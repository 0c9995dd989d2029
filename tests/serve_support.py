"""Serving test support: a tiny trained run, and the real server on a free loopback port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

TINY_CAPTION = "a red square"


def sample_image(size: int = 32, color: tuple[int, int, int] = (220, 30, 30)) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def tiny_trained_run(run: Path, steps: int = 40, lr: float = 1e-2, seed: int = 0) -> Path:
    """A `tiny`-preset stage-2 run in `run/model` that captions `sample_image()` as TINY_CAPTION.

    An existing run there is reused, so several test modules can share one (training takes seconds).
    """
    if (run / "model" / "config.json").is_file():
        return run
    import torch
    from helpers import train_stage2_steps

    from qvlm.config import get_preset
    from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
    from qvlm.models.vlm import QVLM

    torch.manual_seed(seed)
    model = QVLM.build(get_preset("tiny"))
    features = model.encode_images([sample_image()])
    train_stage2_steps(model, features, [DEFAULT_CAPTION_PROMPT], [TINY_CAPTION], steps=steps, lr=lr)
    model.save_pretrained(run / "model")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, port: int | None = None, timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1; yields the base URL, stops it afterwards."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, name="qvlm-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


def sixteen_bit_png(side: int = 5000, channels: int = 4) -> bytes:
    """A `side`×`side` 16-bit PNG (RGBA by default, grey with channels=1) of one flat colour: ~100 KB
    on the wire for 5000×5000, hundreds of MB once decoded. Written by hand: PIL cannot write 16-bit RGBA."""
    import struct
    import zlib

    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    row = b"\x00" + b"\x12\x34" * (side * channels)  # filter byte 0, then the samples
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")

"""Turn an `image_url` into a checked PIL image: base64 `data:` URLs always, http(s) only when allowed.

Size is checked before work is done: the encoded length before base64-decoding, the byte count while
downloading, the pixel count from the header before the pixels are decoded (`load_image`). Decoding
takes one of a few slots (a full-size decode of a 5000×5000 image holds ~100 MB) and the image is shrunk
to about twice the encoder's side at once, so what waits in the model queue is small.
"""

from __future__ import annotations

import base64
import binascii

import anyio
import httpx
from PIL import Image

from qvlm.data.images import BadSample, load_image
from qvlm.serve.errors import APIError
from qvlm.serve.settings import ServeSettings

PARAM = "messages"  # where a chat request holds its image


async def fetch_image(url: str, settings: ServeSettings, decode_slots: anyio.CapacityLimiter,
                      shrink_to: int | None = None, param: str = PARAM) -> Image.Image:
    """The image at `url`; errors about it name `param`, the request field that held it."""
    try:
        return await _fetch_image(url, settings, decode_slots, shrink_to)
    except APIError as e:
        if e.param == PARAM:
            e.param = param
        raise


async def _fetch_image(url: str, settings: ServeSettings, decode_slots: anyio.CapacityLimiter,
                       shrink_to: int | None) -> Image.Image:
    if url.startswith("data:"):
        data = decode_data_url(url, settings.max_image_bytes)
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a base64 "
                           "data: URL (or start the server with --allow-remote-images)", param=PARAM,
                           code="remote_images_disabled")
        data = await download(url, settings)
    else:
        raise APIError(400, "the image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL",
                       param=PARAM, code="invalid_image_url")
    if decode_slots.statistics().tasks_waiting >= settings.max_queue:
        raise APIError(429, "the server is busy: too many images waiting to be decoded, retry shortly",
                       code="queue_full", type_="rate_limit_error")
    # Off the event loop (decoding takes a while), and only `decode_slots` at once.
    return await anyio.to_thread.run_sync(decode_image, data, settings.max_pixels, shrink_to, limiter=decode_slots)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise APIError(400, "image data URLs must be base64: data:image/<type>;base64,<data>", param=PARAM,
                       code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes + 3:  # reject before decoding
        raise _too_big(len(payload) * 3 // 4, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"the image data URL is not valid base64: {e}", param=PARAM,
                       code="invalid_image") from e
    if len(data) > max_bytes:
        raise _too_big(len(data), max_bytes)
    return data


async def download(url: str, settings: ServeSettings) -> bytes:
    """GET `url` with a timeout, stopping as soon as the body passes the byte limit."""
    chunks, total = [], 0
    try:
        async with httpx.AsyncClient(timeout=settings.remote_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"fetching the image failed: HTTP {response.status_code}", param=PARAM,
                                   code="image_fetch_failed")
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > settings.max_image_bytes:
                        raise _too_big(total, settings.max_image_bytes)
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise APIError(400, f"fetching the image failed: {e}", param=PARAM, code="image_fetch_failed") from e
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int, shrink_to: int | None = None) -> Image.Image:
    try:
        return load_image(data, max_pixels=max_pixels, shrink_to=shrink_to)
    except BadSample as e:
        if e.reason == "too_large":
            raise APIError(400, f"the image has too many pixels ({e.detail})", param=PARAM,
                           code="image_too_large") from e
        raise APIError(400, f"the image could not be decoded ({e.reason}): send a PNG, JPEG, WebP or GIF",
                       param=PARAM, code="invalid_image") from e


def _too_big(size: int, limit: int) -> APIError:
    return APIError(400, f"the image is too large ({size} bytes > {limit})", param=PARAM, code="image_too_large")

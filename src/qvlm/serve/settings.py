"""Server settings: where to listen, who may call, and the limits every request is checked against."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from qvlm.serve.errors import ServeError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback bind without an API key
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    max_body_bytes: int = 20 * 1024 * 1024  # the whole JSON request (base64 inflates images by 4/3)
    max_image_bytes: int = 10 * 1024 * 1024  # one decoded image file
    max_pixels: int = 25_000_000  # width × height, checked from the header before decoding
    max_images: int = 1  # image parts per request; the model looks at one image
    max_prompt_chars: int = 2000  # the user text that reaches the model
    max_messages: int = 64
    max_tokens_limit: int = 256  # the largest max_tokens a request may ask for
    default_max_tokens: int = 32
    decode_slots: int = 2  # images decoded at once; each may briefly hold max_pixels × 4 bytes
    batch_size: int = 8  # non-streamed requests with equal settings answered in one model call
    max_queue: int = 256  # waiting requests beyond this get 429

    def validate(self) -> None:
        """Refuse settings that are unsafe or make no sense, with the reason."""
        if not is_loopback(self.host) and not self.api_key and not self.insecure:
            raise ServeError(
                f"refusing to listen on {self.host!r} without an API key: anyone who can reach this "
                "address could use the model (and, with --allow-remote-images, make the server fetch "
                "URLs). Pass --api-key KEY (or set QVLM_API_KEY), or --insecure if the network is trusted.")
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise ServeError("the API key is blank or starts/ends with whitespace, which no client can send "
                             "back (headers are trimmed): choose a key without surrounding spaces")
        for name in ("max_body_bytes", "max_image_bytes", "max_pixels", "max_images", "max_prompt_chars",
                     "max_tokens_limit", "default_max_tokens", "decode_slots", "batch_size", "max_queue",
                     "max_messages"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ServeError("--default-max-tokens cannot exceed --max-tokens-limit")
        if not 0 < self.port < 65536:
            raise ServeError(f"--port must be in 1..65535, got {self.port}")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: could resolve anywhere
        return False

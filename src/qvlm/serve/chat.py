"""Parse and check an OpenAI chat-completions request into what the model needs: one image, one text,
generation settings. Every rejection is an `APIError` with the OpenAI `param` that caused it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
from qvlm.serve.errors import APIError
from qvlm.serve.settings import ServeSettings

ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class GenSettings:
    """Generation settings; requests with equal settings can share one batched model call."""

    max_new_tokens: int
    temperature: float
    top_p: float

    def kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class ChatRequest:
    model: str | None
    text: str  # the user text the model answers (the caption prompt when the user sent none)
    image_url: str  # data: URL, or http(s) when remote images are allowed (checked later)
    gen: GenSettings
    stream: bool
    include_usage: bool


def parse_chat_request(body: object, settings: ServeSettings) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "`model` must be a string", param="model")
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")
    text, image_url = _last_user_turn(body.get("messages"), settings)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "`stream` must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ChatRequest(model=model, text=text, image_url=image_url, gen=_gen_settings(body, settings),
                       stream=stream, include_usage=include_usage)


def _last_user_turn(messages: object, settings: ServeSettings) -> tuple[str, str]:
    """The last user message's text, and the most recent image of the conversation (usually its own)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list", param="messages")
    if len(messages) > settings.max_messages:
        raise APIError(400, f"too many messages ({len(messages)} > {settings.max_messages})",
                       param="messages", code="too_many_messages")
    images: list[str] = []
    text = None
    for i, message in enumerate(messages):
        role, parts = _message_parts(message, i)
        texts = [p["text"] for p in parts if p["type"] == "text"]
        images += [p["url"] for p in parts if p["type"] == "image_url"]
        if role == "user":
            text = "\n".join(t for t in texts if t.strip()).strip()
    if len(images) > settings.max_images:
        raise APIError(400, f"too many images: {len(images)} in this request, at most {settings.max_images}",
                       param="messages", code="too_many_images")
    if text is None:
        raise APIError(400, "no user message in `messages`", param="messages")
    if not images:
        raise APIError(400, "this is a vision model: send an image as an `image_url` content part",
                       param="messages", code="image_required")
    if len(text) > settings.max_prompt_chars:
        raise APIError(400, f"the prompt is too long ({len(text)} characters > {settings.max_prompt_chars})",
                       param="messages", code="prompt_too_long")
    return text or DEFAULT_CAPTION_PROMPT, images[-1]


def _message_parts(message: object, index: int) -> tuple[str, list[dict]]:
    """Normalise one message into (role, [{"type": "text", "text"} | {"type": "image_url", "url"}])."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(400, f"{param} must be an object", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(400, f"{param}.role must be one of {sorted(ROLES)}", param=f"{param}.role")
    content = message.get("content")
    if content is None:
        return role, []
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{param}.content must be a string or a list of parts", param=f"{param}.content")
    return role, [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]


def _part(part: object, param: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image  # some clients send the bare string
        if isinstance(url, str) and url:
            return {"type": "image_url", "url": url}
        raise APIError(400, f"{param}.image_url.url must be a non-empty string", param=param)
    raise APIError(400, f"{param}: unsupported content part (use `text` or `image_url`)", param=param)


def _gen_settings(body: dict, settings: ServeSettings) -> GenSettings:
    limit = settings.max_tokens_limit
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise APIError(400, f"`{param}` must be an integer in 1..{limit}, got {max_tokens!r}", param=param,
                       code="invalid_value")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise APIError(400, "`top_p` must be greater than 0", param="top_p", code="invalid_value")
    return GenSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise APIError(400, f"`{name}` must be a number in [{low}, {high}], got {value!r}", param=name,
                       code="invalid_value")
    return float(value)

"""`POST /v1/attention`: where the Q-Former's queries look on an image, as heat maps over its patches.

Request `{"image": <data: URL, or http(s) when remote images are allowed>, "text": optional}`; the text
matters only to an instruction-aware model, whose queries read it (the caption prompt when absent).
Response `{"grid": G, "num_queries": Nq, "maps": Nq lists of G*G, "mean": G*G}`, patches in raster
order, each map summing to 1 (see `QVLM.patch_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
from qvlm.serve.errors import APIError
from qvlm.serve.settings import ServeSettings

DECIMALS = 6  # far finer than a heat map shows; float32's full repr would triple the response


@dataclass
class AttentionRequest:
    image_url: str
    text: str  # what an instruction-aware model's queries read (the caption prompt when none was sent)


def parse_attention_request(body: object, settings: ServeSettings) -> AttentionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise APIError(400, "`image` must be the image as a data: URL (data:image/png;base64,...), or an "
                       "http(s) URL when the server allows remote images", param="image", code="image_required")
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise APIError(400, "`text` must be a string", param="text")
    text = (text or "").strip()
    if len(text) > settings.max_prompt_chars:
        raise APIError(400, f"the text is too long ({len(text)} characters > {settings.max_prompt_chars})",
                       param="text", code="prompt_too_long")
    return AttentionRequest(image_url=image, text=text or DEFAULT_CAPTION_PROMPT)


def attention_body(maps: torch.Tensor) -> dict:
    """One image's maps [Nq, G, G] -> the response body."""
    flat = maps.flatten(1).double()  # [Nq, G*G]; float64, so the rounded values print short
    return {"grid": maps.shape[-1], "num_queries": maps.shape[0],
            "maps": flat.round(decimals=DECIMALS).tolist(), "mean": flat.mean(0).round(decimals=DECIMALS).tolist()}

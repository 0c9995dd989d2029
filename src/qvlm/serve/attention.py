"""`POST /v1/attention`: where the Q-Former's queries look on an image, as heat maps over its patches.

Request `{"image": <data: URL, or http(s) when remote images are allowed>, "text": optional, "words":
optional bool}`; the text matters to an instruction-aware model, whose queries read it, and to `words`
(the caption prompt when absent).
Response `{"grid": G, "num_queries": Nq, "maps": Nq lists of G*G, "mean": G*G}`, patches in raster
order, each map summing to 1 (see `QVLM.patch_attention`). With `"words": true` (stage-2 models), also
`"words": {"tokens": T pieces of the model's greedy answer to the text, "queries": T lists of Nq, each
summing to 1, "image_share": T}`: which queries each word drew on, and how much of its attention went to
the image at all (see `QVLM.word_query_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
from qvlm.serve.errors import APIError
from qvlm.serve.settings import ServeSettings
from qvlm.serve.worker import Attention

DECIMALS = 6  # far finer than a heat map shows; float32's full repr would triple the response


@dataclass
class AttentionRequest:
    image_url: str
    text: str  # what an instruction-aware model's queries read (the caption prompt when none was sent)
    words: bool  # also which queries each word of the answer to `text` drew on


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
    words = body.get("words", False)
    if not isinstance(words, bool):
        raise APIError(400, "`words` must be true or false", param="words")
    return AttentionRequest(image_url=image, text=text or DEFAULT_CAPTION_PROMPT, words=words)


def attention_body(attention: Attention) -> dict:
    """One image's maps [Nq, G, G] (and its answer's word attention) -> the response body."""
    maps = attention.maps
    flat = maps.flatten(1)  # [Nq, G*G]
    body = {"grid": maps.shape[-1], "num_queries": maps.shape[0], "maps": _rounded(flat), "mean": _rounded(flat.mean(0))}
    if attention.words is not None:
        body["words"] = {"tokens": attention.words["tokens"], "queries": _rounded(attention.words["queries"]),
                         "image_share": _rounded(attention.words["image_share"])}
    return body


def _rounded(values: torch.Tensor) -> list:
    return values.double().round(decimals=DECIMALS).tolist()  # float64, so the rounded values print short

"""User-turn texts for stage 2. The chat template and the image slot are applied by `models/processing.py`.

Caption records get a prompt drawn at random from `CAPTION_PROMPTS` (as the article does), so the model
learns to caption whatever the wording; VQA records use the question itself.
"""

from __future__ import annotations

import random

from qvlm.models.processing import DEFAULT_CAPTION_PROMPT

CAPTION_PROMPTS: list[str] = [
    DEFAULT_CAPTION_PROMPT,  # the first, and what `qvlm caption` asks at inference
    "What is shown in the picture?",
    "Write a short caption for this image.",
    "What do you see in this image?",
    "Give a brief description of the picture.",
    "Caption this image.",
    "What does this image show?",
    "Summarize the content of the image in one sentence.",
]


def sample_caption_prompt(rng: random.Random, prompts: list[str] | None = None) -> str:
    """One caption prompt, drawn with the caller's seeded `rng` (reproducible runs)."""
    return rng.choice(prompts or CAPTION_PROMPTS)


def vqa_prompt(question: str) -> str:
    """The user text for a question: the question itself, whitespace-normalised.

    Kept bare on purpose: shorter prompts train faster (docs/design.md#pipeline) and an instruct LM already
    answers questions; the answer format is learned from the answers.
    """
    return " ".join(question.split())

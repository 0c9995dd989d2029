"""User-turn texts for stage 2. The chat template and the image slot are applied by `models/processing.py`.

Caption records get a prompt drawn at random from `CAPTION_PROMPTS` (as the article does), so the model
learns to caption whatever the wording; VQA records use the question itself.
"""

from __future__ import annotations

import random

from qvlm.models.processing import CAPTION_PROMPTS, with_description


def sample_caption_prompt(rng: random.Random, prompts: list[str] | None = None) -> str:
    """One caption prompt, drawn with the caller's seeded `rng` (reproducible runs)."""
    return rng.choice(prompts or CAPTION_PROMPTS)


def vqa_prompt(question: str, description: str | None = None) -> str:
    """The user text for a question: the question itself, whitespace-normalised, behind the image's
    `description` when one is given (`lm.describe_first`).

    Kept bare on purpose: shorter prompts train faster (docs/design.md#pipeline) and an instruct LM already
    answers questions; the answer format is learned from the answers.
    """
    question = " ".join(question.split())
    return question if description is None else with_description(description, question)

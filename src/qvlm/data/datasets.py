"""Map-style training datasets for both stages, from the feature cache or from images.

From the cache (`cache=`), an item holds `features` float32 `[P, Dv]` and no image is ever decoded.
From images (`encoder=`), an item holds `pixel_values` `[3, H, W]` from `encoder.preprocess`; an image
that fails to decode gives None, which the collators drop (counted in `dataset.skips` when loading
runs in the main process).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from qvlm.data.cache import FeatureCache, VisionEncoder
from qvlm.data.images import DEFAULT_MAX_CAPTION_CHARS, BadSample, DataError, SkipCounter, clean_caption
from qvlm.data.prompts import CAPTION_PROMPTS, sample_caption_prompt, vqa_prompt
from qvlm.data.records import Record


@dataclass
class _Entry:
    record: Record | None  # None from the cache: the image is not needed again
    image_key: str
    text: str  # caption (stage 1, stage-2 caption items) or question
    answer: str | None = None
    answers: tuple[str, ...] = ()
    answer_type: str | None = None
    is_question: bool = False
    description: str | None = None  # a question's image described in words (`lm.describe_first`)


class _ImageSource(Dataset):
    """Shared: resolve each record's image to a cache key (or keep it for decoding)."""

    def __init__(self, cache: FeatureCache | None, encoder: VisionEncoder | None,
                 max_caption_chars: int, skips: SkipCounter | None):
        if (cache is None) == (encoder is None):
            raise ValueError("pass exactly one of cache= (features) or encoder= (pixel values)")
        self.cache, self.encoder = cache, encoder
        self.max_caption_chars = max_caption_chars
        self.skips = skips if skips is not None else SkipCounter("samples")
        self.entries: list[_Entry] = []

    def _image_key(self, record: Record) -> str | None:
        """The content hash, or None (counted) when the image is missing or was not cached."""
        try:
            key = record.content_hash()
        except BadSample as e:
            self.skips.record(e, record.key)
            return None
        if self.cache is not None and not self.cache.has(key):
            self.skips.skip("not_cached", record.key)  # failed to decode while building the cache
            return None
        return key

    def _caption(self, text: str, record: Record) -> str | None:
        try:
            return clean_caption(text, self.max_caption_chars)
        except BadSample as e:
            self.skips.record(e, record.key)
            return None

    def __len__(self) -> int:
        return len(self.entries)

    def _image_fields(self, entry: _Entry) -> dict[str, Any] | None:
        if self.cache is not None:
            return {"features": self.cache.get([entry.image_key])[0]}
        try:
            image = entry.record.open_image()
        except BadSample as e:
            self.skips.record(e, entry.record.key)
            return None
        return {"pixel_values": self.encoder.preprocess([image])[0]}

    def check(self, max_bad_fraction: float = 0.05) -> None:
        """Raise `DataError` if too many samples were skipped while building the item list."""
        self.skips.check(max_bad_fraction)


class CaptionDataset(_ImageSource):
    """Stage 1: one item per (image, caption) pair; an image with 5 captions gives 5 items per epoch.

    Item: {features [P, Dv] | pixel_values [3, H, W], caption: str, image_key: str}.
    """

    def __init__(self, records: Iterable[Record], *, cache: FeatureCache | None = None,
                 encoder: VisionEncoder | None = None, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
                 skips: SkipCounter | None = None):
        super().__init__(cache, encoder, max_caption_chars, skips)
        for record in records:
            if not record.captions:
                continue  # VQA-only records have nothing to align in stage 1
            key = self._image_key(record)
            if key is None:
                continue
            for text in record.captions:
                caption = self._caption(text, record)
                if caption is not None:
                    self.skips.ok()
                    self.entries.append(_Entry(None if cache is not None else record, key, caption))
        if not self.entries:
            raise DataError(f"no usable caption pairs ({self.skips.summary()})")

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        fields = self._image_fields(entry)
        if fields is None:
            return None
        return {**fields, "caption": entry.text, "image_key": entry.image_key}

    def captions(self) -> list[str]:
        return [e.text for e in self.entries]


class InstructionDataset(_ImageSource):
    """Stage 2: caption records become (random caption prompt, caption), VQA records (question, answer).

    The caption prompt of item i is drawn from a generator seeded by (seed, epoch, i): reproducible,
    and different each epoch after `set_epoch`. The answer of a VQA record is its most common answer.
    With `describe_first`, a question's prompt starts with the first caption of the same image in the
    data (`vqa_prompt`); questions about an image without one stay bare (`undescribed` counts them).
    Item: {features | pixel_values, prompt: str (what the model is trained on), user_text: str (what a
    user asks: the prompt without the description), description: str|None (in front of a question's
    prompt), answer: str, answers: list[str],
    answer_type: str|None, image_key: str}.
    """

    def __init__(self, records: Iterable[Record], *, cache: FeatureCache | None = None,
                 encoder: VisionEncoder | None = None, seed: int = 0, caption_prompts: list[str] | None = None,
                 use_captions: bool = True, use_vqa: bool = True, describe_first: bool = False,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, skips: SkipCounter | None = None):
        super().__init__(cache, encoder, max_caption_chars, skips)
        self.seed, self.epoch = seed, 0
        self.caption_prompts = list(caption_prompts or CAPTION_PROMPTS)
        self.caption_prompt_chars = sum(map(len, self.caption_prompts)) / len(self.caption_prompts)
        for record in records:
            wanted = (record.is_vqa and use_vqa) or (bool(record.captions) and use_captions)
            if not wanted:
                continue
            key = self._image_key(record)
            if key is None:
                continue
            keep = None if cache is not None else record
            if record.is_vqa and use_vqa:
                self._add_vqa(record, key, keep)
            if record.captions and use_captions:
                for text in record.captions:
                    caption = self._caption(text, record)
                    if caption is not None:
                        self.skips.ok()
                        self.entries.append(_Entry(keep, key, caption, answer=caption))
        if not self.entries:
            raise DataError(f"no usable stage-2 samples ({self.skips.summary()})")
        self.undescribed = self._describe_questions() if describe_first else 0

    def _describe_questions(self) -> int:
        """Give each question the first caption of its image; returns how many found none."""
        descriptions: dict[str, str] = {}
        for entry in self.entries:
            if not entry.is_question:
                descriptions.setdefault(entry.image_key, entry.answer)
        questions = [entry for entry in self.entries if entry.is_question]
        for entry in questions:
            entry.description = descriptions.get(entry.image_key)
        return sum(entry.description is None for entry in questions)

    def _add_vqa(self, record: Record, key: str, keep: Record | None) -> None:
        answer = record.best_answer()
        if not record.question or not record.question.strip() or not answer or not answer.strip():
            self.skips.skip("empty_qa", record.key)
            return
        self.skips.ok()
        self.entries.append(_Entry(keep, key, vqa_prompt(record.question), answer=" ".join(answer.split()),
                                   answers=tuple(record.answers), answer_type=record.answer_type,
                                   is_question=True))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompt(self, index: int) -> str:
        entry = self.entries[index]
        if entry.is_question:
            return vqa_prompt(entry.text, entry.description)
        return self.user_text(index)

    def user_text(self, index: int) -> str:
        entry = self.entries[index]
        if entry.is_question:
            return entry.text
        rng = random.Random(hash((self.seed, self.epoch, index)))  # ints hash deterministically
        return sample_caption_prompt(rng, self.caption_prompts)

    def estimated_length(self, index: int) -> int:
        """Rough token count of prompt + answer (≈ 4 characters a token), for length bucketing. A
        caption's prompt is drawn anew each epoch, so it counts at the prompts' mean length."""
        entry = self.entries[index]
        prompt = len(entry.text) + len(entry.description or "") if entry.is_question else self.caption_prompt_chars
        return int(prompt + len(entry.answer or "")) // 4 + 1

    def lengths(self) -> list[int]:
        return [self.estimated_length(i) for i in range(len(self.entries))]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        fields = self._image_fields(entry)
        if fields is None:
            return None
        return {**fields, "prompt": self.prompt(index), "user_text": self.user_text(index),
                "description": entry.description if entry.is_question else None, "answer": entry.answer,
                "answers": list(entry.answers) or [entry.answer], "answer_type": entry.answer_type,
                "image_key": entry.image_key}

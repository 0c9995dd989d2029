"""Collators for both stages and a length-grouped batch sampler.

Items that failed to decode arrive as None and are dropped here, so one bad image costs one sample,
not the run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from qvlm.models.processing import description_chars, qformer_text_inputs


def _stack_image(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """features `[B, P, Dv]` or pixel_values `[B, 3, H, W]`, whichever the items carry."""
    name = "features" if "features" in items[0] else "pixel_values"
    return {name: torch.stack([item[name] for item in items])}


class Stage1Collator:
    """Batch for contrastive alignment.

    Returns {features | pixel_values, captions: list[str], image_keys: list[str]}; the loss derives the
    positives with `models.objectives.positive_pairs` (over the batch of all processes when training
    on several).
    """

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [item for item in items if item is not None]
        if not items:
            return {}
        captions = [item["caption"] for item in items]
        keys = [item["image_key"] for item in items]
        return {**_stack_image(items), "captions": captions, "image_keys": keys}


class Stage2Collator:
    """Batch for instruction tuning: token tensors from `models.processing.build_stage2_batch` plus the image.

    Returns {features | pixel_values, input_ids [B, L], attention_mask [B, L], image_mask [B, L],
    labels [B, L], prompts, user_texts (the prompts as a user asks them: without `lm.describe_first`'s
    description), answers (the target), references (all answers), answer_types, image_keys},
    plus qformer_input_ids / qformer_attention_mask [B, T] (the prompts in the Q-Former's vocabulary)
    when `qformer_tokenizer` is given (instruction-aware models).
    """

    def __init__(self, tokenizer: Any, num_queries: int, image_position: str = "before",
                 system_prompt: str | None = None, max_answer_tokens: int | None = None,
                 build_batch: Any = None, qformer_tokenizer: Any = None, qformer_max_len: int = 32,
                 learn_description: bool = False):
        """`build_batch` replaces `build_stage2_batch` (tests); same signature. `learn_description`: train
        on each item's `description` in front of its question as well (`lm.learn_description`)."""
        self.tokenizer = tokenizer
        self.learn_description = learn_description
        self.qformer_tokenizer, self.qformer_max_len = qformer_tokenizer, qformer_max_len
        self.num_queries = num_queries
        self.image_position = image_position
        self.system_prompt = system_prompt
        self.max_answer_tokens = max_answer_tokens
        if build_batch is None:
            from qvlm.models.processing import build_stage2_batch as build_batch
        self.build_batch = build_batch

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        items = [item for item in items if item is not None]
        if not items:
            return {}
        prompts = [item["prompt"] for item in items]
        answers = [item["answer"] for item in items]
        learned = [description_chars(item.get("description")) if self.learn_description else 0 for item in items]
        tokens = self.build_batch(self.tokenizer, prompts, answers, self.num_queries,
                                  image_position=self.image_position, system_prompt=self.system_prompt,
                                  max_answer_tokens=self.max_answer_tokens, learned_chars=learned)
        if self.qformer_tokenizer is not None:
            tokens |= qformer_text_inputs(self.qformer_tokenizer, prompts, self.qformer_max_len)
        return {**_stack_image(items), **tokens, "prompts": prompts, "answers": answers,
                "user_texts": [item.get("user_text", item["prompt"]) for item in items],
                "references": [item.get("answers") or [item["answer"]] for item in items],
                "answer_types": [item.get("answer_type") for item in items],
                "image_keys": [item["image_key"] for item in items]}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in random order: less padding, same randomness across epochs.

    Indices are shuffled, cut into mega-batches of `mega_batch_mult × batch_size`, sorted by length
    (longest first) inside each, cut into batches; then the batch order is shuffled. Seeded by
    (seed, epoch); call `set_epoch` each epoch.

    Several processes: batches are global (`batch_size × world_size`) and process `rank` yields its
    slice of each, so every sample is seen once per epoch. `skip` leaves out the first batches of the
    epoch (resuming mid-epoch); the order depends only on (seed, epoch), so a resumed run continues
    exactly where it stopped.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega_batch_mult: int = 50, seed: int = 0,
                 drop_last: bool = False, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rank, self.global_batch = rank, batch_size * world_size
        self.mega = max(1, mega_batch_mult) * self.global_batch
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.drop_last, self.shuffle = drop_last or world_size > 1, shuffle  # slices need full batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.mega):
            mega = sorted(order[start:start + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(mega[i:i + self.global_batch] for i in range(0, len(mega), self.global_batch))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.global_batch]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.batch_size
        for batch in self.batches()[self.skip:]:
            yield batch[start:start + self.batch_size]

    def __len__(self) -> int:
        # Short batches can close every mega-batch, so count them the way they are made.
        return max(0, len(self.batches()) - self.skip)

"""Prompts, stage-2 token sequences and `QVLMProcessor` (what turns images and text into model inputs).

A stage-2 sequence is `[prompt with the image slot][answer tokens][EOS]`, left-padded. The prompt is the
user turn rendered with the LM's own chat template. The image slot is `num_queries` placeholder positions
whose embeddings the model replaces with the adapter outputs (`image_mask`). Labels are -100 everywhere
except on the answer tokens and the EOS that ends them: the EOS target is kept even when the tokenizer's
pad token *is* EOS (SmolLM2), otherwise the model never learns to stop. An answer cut at
`max_answer_tokens` gets no EOS: stopping there would teach the model to stop mid-sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import PILImageResampling
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

DEFAULT_CAPTION_PROMPT = "Describe this image."  # what `qvlm caption` asks at inference
# The caption requests stage 2 trains with, one drawn at random per caption record (as the article does),
# so the model captions whatever the wording.
CAPTION_PROMPTS: list[str] = [
    DEFAULT_CAPTION_PROMPT,
    "What is shown in the picture?",
    "Write a short caption for this image.",
    "What do you see in this image?",
    "Give a brief description of the picture.",
    "Caption this image.",
    "What does this image show?",
    "Summarize the content of the image in one sentence.",
]
IMAGE_MARKER = "<image>"
USER_MARKER = "<qvlm-user-text>"  # where the user text goes: it is tokenised apart, see prompt_token_ids
IGNORE = -100


def render_prompt(tokenizer, image_position: str = "before", system_prompt: str | None = None) -> str:
    """The chat-templated prompt up to the assistant's turn, with IMAGE_MARKER where the image goes and
    USER_MARKER where the user text goes.

    With `system_prompt=None` no system turn is rendered at all, even when the template would add a
    default one (SmolLM2's adds ~30 tokens; sequence length sets stage-2 speed).
    """
    inside = {"before": f"{IMAGE_MARKER}\n{USER_MARKER}", "after": f"{USER_MARKER}\n{IMAGE_MARKER}",
              "after_turn": USER_MARKER}
    if image_position not in inside:
        raise ValueError(f"image_position must be one of {', '.join(inside)}, got {image_position!r}")
    user = {"role": "user", "content": inside[image_position]}
    system = {"role": "system", "content": system_prompt or ""}
    full = tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    if image_position == "after_turn":  # the article's layout: user turn, image, then the assistant turn
        turns = tokenizer.apply_chat_template([system, user], tokenize=False, add_generation_prompt=False)
        full = turns + IMAGE_MARKER + full[len(turns):]
    if system_prompt is not None:
        return full
    # Cut the (empty) system turn: what the template renders for it alone is a prefix of the full text.
    system_only = tokenizer.apply_chat_template([system], tokenize=False, add_generation_prompt=False)
    return full[len(system_only):] if full.startswith(system_only) else full


def with_description(description: str, user_text: str) -> str:
    """`lm.describe_first`: the image's description in front of a user text, as one sentence before it
    ("a blue triangle. is there a red shape?")."""
    return f"{' '.join(description.split()).rstrip('.')}. {' '.join(user_text.split())}"


def is_caption_request(user_text: str) -> bool:
    """Whether a user text is one of the caption requests (`CAPTION_PROMPTS`), which `lm.describe_first`
    leaves as they are: the description is the answer to them."""
    return " ".join(user_text.split()) in CAPTION_PROMPTS


def description_chars(description: str | None) -> int:
    """How many leading characters of `with_description(description, question)` are the description
    (its closing full stop included); 0 without one."""
    return len(with_description(description, "").rstrip()) if description else 0


def prompt_token_ids(tokenizer, prompt: str, user_text: str, num_queries: int, slot_id: int,
                     learned_chars: int = 0) -> tuple[list[int], list[bool], list[bool]]:
    """Tokenise a rendered prompt, expanding IMAGE_MARKER into `num_queries` slot positions and USER_MARKER
    into `user_text`'s tokens. Returns ids, is_image and `learned`: the user-text tokens that lie within
    its first `learned_chars` characters (trained on like an answer: `lm.describe_first`'s description).

    The user text is tokenised with `split_special_tokens`: a user who types `<|im_end|><|im_start|>` gets
    those characters as plain text, never the template's control tokens (nor an image slot for `<image>`).
    """
    pieces = re.split(f"({re.escape(IMAGE_MARKER)}|{re.escape(USER_MARKER)})", prompt)
    for marker in (IMAGE_MARKER, USER_MARKER):
        if pieces.count(marker) != 1:
            raise ValueError(f"prompt must hold {marker} once: {prompt!r}")
    ids: list[int] = []
    is_image: list[bool] = []
    learned: list[bool] = []
    for piece in pieces:
        if piece == IMAGE_MARKER:
            ids += [slot_id] * num_queries
            is_image += [True] * num_queries
            learned += [False] * num_queries
            continue
        if piece == USER_MARKER:
            tokens = tokenizer(user_text, add_special_tokens=False, split_special_tokens=True,
                               return_offsets_mapping=learned_chars > 0)
            piece_ids = tokens.input_ids
            learned += ([end <= learned_chars for _, end in tokens.offset_mapping] if learned_chars
                        else [False] * len(piece_ids))
        else:
            piece_ids = tokenizer(piece, add_special_tokens=False).input_ids if piece else []
            learned += [False] * len(piece_ids)
        ids += piece_ids
        is_image += [False] * len(piece_ids)
    return ids, is_image, learned


def build_stage2_batch(tokenizer, user_texts: list[str], answers: list[str] | None, num_queries: int,
                       image_position: str = "before", system_prompt: str | None = None,
                       max_answer_tokens: int | None = None,
                       learned_chars: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Tokenise a batch for training (answers given) or generation (answers=None).

    Returns left-padded tensors: input_ids [B, L] long, attention_mask [B, L] long (0 on padding),
    image_mask [B, L] bool (the Nq slot positions), and labels [B, L] long (-100 except answer + EOS,
    and the first `learned_chars[i]` characters of user text i: `description_chars`) when answers are
    given.
    """
    if answers is not None and len(answers) != len(user_texts):
        raise ValueError(f"{len(user_texts)} prompts but {len(answers)} answers")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    prompt = render_prompt(tokenizer, image_position, system_prompt)
    for i, text in enumerate(user_texts):
        chars = learned_chars[i] if learned_chars is not None and answers is not None else 0
        ids, is_image, learned = prompt_token_ids(tokenizer, prompt, text, num_queries, pad_id, chars)
        labels = [token if learn else IGNORE for token, learn in zip(ids, learned, strict=True)]
        if answers is not None:
            answer_ids = tokenizer(answers[i].strip(), add_special_tokens=False).input_ids
            if max_answer_tokens is None or len(answer_ids) <= max_answer_tokens:
                answer_ids = answer_ids + [tokenizer.eos_token_id]
            else:
                answer_ids = answer_ids[:max_answer_tokens]  # cut: no EOS
            ids, labels = ids + answer_ids, labels + answer_ids  # EOS labelled even when EOS == PAD
            is_image = is_image + [False] * len(answer_ids)
        rows.append((ids, is_image, labels))
    length = max(len(ids) for ids, _, _ in rows)
    batch = {"input_ids": [], "attention_mask": [], "image_mask": [], "labels": []}
    for ids, is_image, labels in rows:
        pad = length - len(ids)
        batch["input_ids"].append([pad_id] * pad + ids)
        batch["attention_mask"].append([0] * pad + [1] * len(ids))
        batch["image_mask"].append([False] * pad + is_image)
        batch["labels"].append([IGNORE] * pad + labels)
    out = {
        "input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(batch["attention_mask"], dtype=torch.long),
        "image_mask": torch.tensor(batch["image_mask"], dtype=torch.bool),
    }
    if answers is not None:
        out["labels"] = torch.tensor(batch["labels"], dtype=torch.long)
    return out


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the labelled positions that hold each row's answer (+ EOS), the labels after the
    row's last IGNORE (left padding puts the answer at the end of every row). Labelled positions before
    it are the description that `lm.learn_description` trains on."""
    ignored_at_or_after = (labels == IGNORE).flip(-1).cumsum(-1).flip(-1) > 0
    return ~ignored_at_or_after


def truncated_answers(labels: torch.Tensor, eos_id: int) -> int:
    """How many rows of a training batch hold an answer cut at `max_answer_tokens`: labels [B, L] are
    left-padded, so each row's last position is its EOS unless the answer was cut."""
    return int((labels[:, -1] != eos_id).sum())


def qformer_text_inputs(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """The user texts as the Q-Former's tokens (instruction-aware models): ids and mask [B, T]."""
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"qformer_input_ids": tokens.input_ids, "qformer_attention_mask": tokens.attention_mask}


def completion_lengths(sequences: torch.Tensor, eos_token_id: int) -> tuple[list[int], list[bool]]:
    """What `generate` really produced per row: new-token ids [B, T] (rows that ended early are padded)
    -> the token count up to and including the row's first EOS, and whether it ended with EOS (False:
    cut at max_new_tokens or by a stopping criterion)."""
    is_eos = sequences == eos_token_id  # [B, T]
    stopped = is_eos.any(-1)
    counts = torch.where(stopped, is_eos.int().argmax(-1) + 1, sequences.shape[-1])
    return counts.tolist(), stopped.tolist()


def image_processor_for(image_size: int, mean, std) -> ViTImageProcessorPil:
    """The transformers image processor that reproduces `FrozenVisionEncoder.preprocess` exactly
    (bicubic resize to a square, rescale to [0, 1], normalise); RGB conversion happens before it."""
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
                                image_mean=list(mean), image_std=list(std), do_convert_rgb=False)


class QVLMProcessor(ProcessorMixin):
    """Images and user texts -> QVLM inputs, called as transformers processors are:
    `processor(images=..., text=...)`.

    Each text is rendered into the LM's chat-templated prompt with the image slot expanded to
    `num_query_tokens` positions (`image_mask`), then left-padded (`build_stage2_batch`); an
    instruction-aware model also gets the text in the Q-Former's vocabulary. Without text, images get
    the caption prompt. Returns a BatchFeature: pixel_values [B, 3, S, S], input_ids / attention_mask /
    image_mask [B, L], and qformer_input_ids / qformer_attention_mask [B, T] when instruction-aware.
    """

    def __init__(self, image_processor, tokenizer, qformer_tokenizer, num_query_tokens: int = 32,
                 image_position: str = "before", system_prompt: str | None = None, qformer_max_length: int = 32,
                 instruction_aware: bool = False, **kwargs):
        self.num_query_tokens = num_query_tokens
        self.image_position = image_position
        self.system_prompt = system_prompt
        self.qformer_max_length = qformer_max_length
        self.instruction_aware = instruction_aware
        super().__init__(image_processor, tokenizer, qformer_tokenizer, **kwargs)

    def __call__(self, images: Image.Image | list[Image.Image] | None = None, text: str | list[str] | None = None,
                 **kwargs) -> BatchFeature:
        images = [images] if isinstance(images, Image.Image) else images
        if images is None and text is None:
            raise ValueError("QVLMProcessor needs images=..., text=... or both")
        texts = [text] if isinstance(text, str) else text
        if texts is None:
            texts = [DEFAULT_CAPTION_PROMPT] * len(images)
        if images is not None and len(texts) == 1 < len(images):
            texts = texts * len(images)  # one question about every image
        if images is not None and len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: pass one text, or one per image")
        out = build_stage2_batch(self.tokenizer, texts, None, self.num_query_tokens, self.image_position,
                                 self.system_prompt)
        if self.instruction_aware:
            out |= qformer_text_inputs(self.qformer_tokenizer, texts, self.qformer_max_length)
        if images is not None:
            rgb = [image.convert("RGB") for image in images]
            out["pixel_values"] = self.image_processor(rgb, return_tensors="pt").pixel_values
        return BatchFeature(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """A model folder, a hub id, or a run folder (whose model/ holds the processor's files)."""
        model = Path(pretrained_model_name_or_path) / "model"
        if (model / "processor_config.json").is_file():
            pretrained_model_name_or_path = model
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "image_mask", "pixel_values"]
        return names + (["qformer_input_ids", "qformer_attention_mask"] if self.instruction_aware else [])

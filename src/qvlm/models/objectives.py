"""The training objectives, next to the model they train; each returns one `ObjectiveOutput`.

Stage 1 (`Stage1Objective`) trains the Q-Former with BLIP-2's three losses side by side in one
forward, each under its own attention mask (`qformer.MODES`): ITC (unimodal: queries and text apart),
ITM (bidirectional: queries and text see each other) and ITG (causal: text sees the queries and earlier
text). Stage 2 (`Stage2Objective`) trains the adapter and LoRA (optionally the Q-Former) with the LM's
next-token loss on the answers (and on the image's description, with `lm.learn_description`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qvlm.config import QVLMConfig
from qvlm.models.processing import IGNORE, answer_positions


@dataclass
class ObjectiveOutput:
    """One forward's result: `loss` (what backward runs on) is the sum of `weights[k] * losses[k]`;
    `metrics` are detached numbers logged beside it (stage 1: in-batch retrieval R@1)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    weights: dict[str, float]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def weighted(cls, losses: dict[str, torch.Tensor], weights: dict[str, float],
                 metrics: dict[str, torch.Tensor] | None = None) -> ObjectiveOutput:
        used = {name: weights[name] for name in losses}
        return cls(sum(used[name] * value for name, value in losses.items()), losses, used, metrics or {})

    def scalars(self) -> dict[str, torch.Tensor]:
        """What a log line shows: the loss, each named part, each metric."""
        return {"loss": self.loss, **self.losses, **self.metrics}


class Stage1Objective(nn.Module):
    """The Q-Former's three objectives as one forward, so DDP sees (and syncs) every gradient."""

    def __init__(self, model: nn.Module, config: QVLMConfig):
        super().__init__()
        self.qformer = model.qformer
        self.tokenizer = model.text_tokenizer
        s = config.stage1
        self.weights = {"itc": s.itc_weight, "itm": s.itm_weight, "itg": s.itg_weight}
        self.max_len = config.qformer.max_text_len

    def forward(self, features: torch.Tensor, captions: list[str], image_keys: list[str]) -> ObjectiveOutput:
        """features [b, P, Dv] and b captions of this process -> losses itc [, itm] [, itg], metric r1.

        With several processes, ITC contrasts this process's items against the whole global batch
        (embeddings gathered with gradients, as BLIP-2 does), so N processes of batch b compute the
        same loss and gradient as one process of batch N*b. ITM and ITG stay within the local batch.
        """
        ids, mask, positives = self._text_side(captions, image_keys, features.device)  # [b, T] x2, [B, B]
        image_embeds = self.qformer.image_embeds(features)  # unimodal mask: [b, Nq, E]
        text_embeds = self.qformer.text_embeds(ids, mask)  # text alone: [b, E]
        all_images, offset = _gather_with_grad(image_embeds)  # [B, Nq, E]
        all_texts, _ = _gather_with_grad(text_embeds)  # [B, E]
        local = slice(offset, offset + len(captions))
        positives = positives[local]  # [b, B]
        sim_i2t = self.qformer.similarity(image_embeds, all_texts)  # [b, B]
        sim_t2i = self.qformer.similarity(all_images, text_embeds).t()  # [b, B]
        losses = {"itc": self.qformer.itc_loss(sim_i2t, sim_t2i, positives)}
        if self.weights["itm"] > 0:  # bidirectional mask, hard negatives from the ITC similarities
            losses["itm"] = self.qformer.itm_loss(features, ids, mask, sim_i2t[:, local].detach(),
                                                  positives[:, local])
        if self.weights["itg"] > 0:  # causal mask
            losses["itg"] = self.qformer.itg_loss(features, ids, mask)
        # image->text R@1 over the global batch: is the best-scoring caption a true pair?
        r1 = positives.gather(1, sim_i2t.argmax(1, keepdim=True)).float().mean().detach()
        return ObjectiveOutput.weighted(losses, self.weights, {"r1": r1})

    @torch.compiler.disable  # string work: traced, every new caption would trigger a recompile
    def _text_side(self, captions: list[str], image_keys: list[str], device) -> tuple:
        """Token ids and mask [b, T] of this process's captions; which items of the global batch are
        true pairs [B, B] (repeated captions and several captions of one image count)."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt").to(device)
        positives = positive_pairs(_gather_objects(captions), _gather_objects(image_keys))
        return tokens.input_ids, tokens.attention_mask, positives.to(device)


class Stage2Objective(nn.Module):
    """The LM's next-token cross-entropy on a `Stage2Collator` batch, in parts: `answer` (the answer
    tokens + EOS that end each row) and, with `learn_description` (`lm.learn_description`),
    `description` (the image's description in front of the question).

    Each part is the mean over its own tokens, so a two-token answer weighs as much as a ten-token
    description (one mean over both made the answers about a sixth of the loss); logged apart, the
    parts show which one a stalled run is stuck on (docs/BENCHMARKS.md, issue 14, seventh look)."""

    def __init__(self, model: nn.Module, learn_description: bool = False):
        super().__init__()
        self.model = model
        self.learn_description = learn_description

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor, **qformer_text: torch.Tensor) -> ObjectiveOutput:
        """features [B, P, Dv], token tensors [B, L]; `qformer_text`: the prompts' Q-Former tokens
        (qformer_input_ids / qformer_attention_mask [B, T]) for instruction-aware models."""
        out = self.model(features, input_ids, attention_mask, image_mask, labels, return_loss=False,
                         **qformer_text)
        targets = labels[:, -out.logits.shape[1]:]  # the last K positions, the ones the logits cover: [B, K]
        labelled = targets != IGNORE  # [B, K]
        # Only the N labelled rows reach the fp32 softmax over the vocabulary: the window's padding rows
        # would add their share of its casts, softmax and backward (docs/BENCHMARKS.md, issue 20).
        per_token = F.cross_entropy(out.logits[labelled].float(), targets[labelled], reduction="none")  # [N]
        is_answer = answer_positions(targets)[labelled]  # [N]
        losses = {"answer": _mean_where(per_token, is_answer)}
        if self.learn_description:  # a part every batch has (0 without descriptions), so logs line up
            losses["description"] = _mean_where(per_token, ~is_answer)
        return ObjectiveOutput.weighted(losses, {"answer": 1.0, "description": 1.0})


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def normalise_caption(text: str) -> str:
    """Lower-case, strip, collapse whitespace: "A  Red Circle " == "a red circle"."""
    return " ".join(text.lower().split())


def same_caption_matrix(captions: Sequence[str]) -> torch.Tensor:
    """bool `[B, B]`: True where captions i and j are equal after `normalise_caption` (diagonal True).

    In a contrastive batch these pairs are extra positives, not negatives (easy-VQA has only 24
    distinct captions, so repeats in a batch are the rule).
    """
    return _same_code_matrix([normalise_caption(c) for c in captions])


def positive_pairs(captions: Sequence[str], image_keys: Sequence[str]) -> torch.Tensor:
    """bool `[B, B]`: the true image-text pairs of a contrastive batch of (image, caption) items.

    Item i's image matches item j's caption when the captions are equal (`same_caption_matrix`) or
    both captions belong to the same image.
    """
    return same_caption_matrix(captions) | _same_code_matrix(image_keys)


def _same_code_matrix(values: Sequence[str]) -> torch.Tensor:
    """bool `[B, B]`: True where values i and j are equal."""
    ids: dict[str, int] = {}
    codes = torch.tensor([ids.setdefault(v, len(ids)) for v in values])
    return codes[:, None] == codes[None, :]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _gather_with_grad(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every process's [b, ...] tensor (gradients flow back to each owner); return it and
    the offset of this process's rows. Identity on one process."""
    if not _distributed():
        return local, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(local)), torch.distributed.get_rank() * local.shape[0]


def _gather_objects(local: list) -> list:
    """Every process's list, concatenated in rank order (the order `_gather_with_grad` uses)."""
    if not _distributed():
        return local
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return [x for part in parts for x in part]

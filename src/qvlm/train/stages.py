"""Each training stage described once, as a `Stage`; `trainer.train` runs any of them with one loop.

Stage 1 aligns the Q-Former with text (ITC, optionally ITM and ITG) on captions; stage 2 trains adapter +
LoRA (and optionally the Q-Former) to generate answers. A `Stage` holds what differs between them: the
model and its objective, datasets and collator, parameter groups, the statistics kept per batch, the
metrics validation adds, and what is reported after training.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from qvlm import precision
from qvlm.config import QVLMConfig, Stage1Config, Stage2Config
from qvlm.data.collate import Stage1Collator, Stage2Collator
from qvlm.data.datasets import CaptionDataset, InstructionDataset
from qvlm.data.pipeline import training_data
from qvlm.data.stream import StreamingBatches
from qvlm.errors import QVLMError
from qvlm.eval.metrics import caption_scores, exact_match
from qvlm.models.objectives import Stage1Objective, Stage2Objective
from qvlm.models.processing import truncated_answers
from qvlm.models.vlm import QVLM, model_folder, read_config, read_trainable
from qvlm.train.optim import stage1_param_groups, stage2_param_groups


def _nothing(*args) -> dict:
    """The default of a stage's optional parts: nothing to count, log or report."""
    return {}


@dataclass
class Stage:
    """What one training stage trains, on what, and what it reports; `trainer.train` runs it."""

    number: int
    settings: Stage1Config | Stage2Config  # config.stage1 or config.stage2
    model: QVLM
    objective: nn.Module  # forward(**batch[inputs]) -> ObjectiveOutput
    inputs: tuple[str, ...]  # the batch keys the objective takes (optional ones may be absent)
    train_set: Dataset
    val_set: Dataset | None
    collate: Callable[[list], dict]
    lengths: list[int]  # per training sample, for length-grouped batches; all equal: random batches
    param_groups: list[dict]
    on_epoch: Callable[[int], object] = _nothing  # called with each epoch's number before it starts
    count: Callable[[dict], object] = _nothing  # sees every training batch
    log_fields: Callable[[], dict] = _nothing  # more fields for each log line
    extra_validation: Callable[[], dict] = _nothing  # metrics beyond val_loss and the objective's metrics
    after_training: Callable[[Accelerator], dict] = _nothing  # one more log record after the last step


def build(number: int, config: QVLMConfig, data: str, val: str | None, init: str | None,
          accelerator: Accelerator, mixed_precision: str) -> Stage:
    """The description of stage `number`, its model on the accelerator's device and its data ready."""
    return {1: stage1, 2: stage2}[number](config, data, val, init, accelerator, mixed_precision)


def stage1(config: QVLMConfig, data: str, val: str | None, init: str | None, accelerator: Accelerator,
           mixed_precision: str) -> Stage:
    """Q-Former alignment: built from its pretrained text encoder (no --init); random batches, since
    grouping captions by length would make contrastive negatives easier."""
    model = QVLM.build(config, stage=1).to(accelerator.device)
    train_set, val_set = _datasets(config, 1, data, val, model, accelerator, CaptionDataset)
    _settle_epochs(config.stage1, 1, train_set, accelerator)
    return Stage(1, config.stage1, model, Stage1Objective(model, config), ("features", "captions", "image_keys"),
                 train_set, val_set, Stage1Collator(), _equal_lengths(train_set), stage1_param_groups(model, config))


def stage2(config: QVLMConfig, data: str, val: str | None, init: str | None, accelerator: Accelerator,
           mixed_precision: str) -> Stage:
    """Instruction tuning from a stage-1 run's Q-Former (`init`); batches of similar length
    (`train.group_by_length`: less padding)."""
    s = config.stage2
    model = stage2_model(config, init).to(accelerator.device)
    if mixed_precision == "bf16":
        precision.store_frozen_in(model.lm, torch.bfloat16)
    make = partial(InstructionDataset, seed=config.train.seed, describe_first=config.lm.describe_first)
    train_set, val_set = _datasets(config, 2, data, val, model, accelerator, make)
    _settle_epochs(s, 2, train_set, accelerator)
    if isinstance(train_set, InstructionDataset):
        counts = answer_token_counts([e.answer for e in train_set.entries], model.tokenizer)
        if s.max_answer_tokens == "auto":  # the saved config.json records the number chosen
            s.max_answer_tokens = percentile(counts, 0.99)
            accelerator.print(f"stage2.max_answer_tokens=auto: {s.max_answer_tokens} tokens keep 99% of the "
                              "training answers whole")
        accelerator.print(answer_lengths(counts, s.max_answer_tokens))
        if config.lm.describe_first:
            accelerator.print(_described(train_set))
    elif s.max_answer_tokens == "auto":
        raise QVLMError("stage2.max_answer_tokens=auto reads every training answer first, which a stream "
                        "(train.stream=true) does not; set a number of tokens")
    learn_description = config.lm.describe_first and config.lm.learn_description
    collate = Stage2Collator(model.tokenizer, config.qformer.num_queries, config.lm.image_position,
                             config.lm.system_prompt, s.max_answer_tokens,
                             qformer_tokenizer=model.text_tokenizer if config.qformer.instruction_aware else None,
                             qformer_max_len=config.qformer.max_text_len,
                             learn_description=learn_description)
    stats = AnswerStats(model.tokenizer.eos_token_id, s.max_answer_tokens)
    scores = partial(_generation_scores, model, val_set, collate, s.batch_size, accelerator.device, 4)
    return Stage(2, s, model, Stage2Objective(model, learn_description),
                 ("features", "input_ids", "attention_mask", "image_mask", "labels",
                  "qformer_input_ids", "qformer_attention_mask"),  # the last two: instruction-aware
                 train_set, val_set, collate,
                 train_set.lengths() if config.train.group_by_length and not config.train.stream
                 else _equal_lengths(train_set),
                 stage2_param_groups(model, config),
                 # caption prompts are redrawn each epoch; a stream draws them as it reads
                 on_epoch=train_set.set_epoch if isinstance(train_set, InstructionDataset) else _nothing,
                 count=stats.count, log_fields=stats.log_fields, extra_validation=scores if val_set is not None else _nothing,
                 after_training=stats.report)


# `stageN.epochs=auto`: epochs for about this many training samples seen, one at least. On ~1.8k
# openclipart pairs (docs/BENCHMARKS.md, issue 15) stage-1 validation recall stopped rising after ~14k
# samples; stage-2 validation CIDEr-D peaked near 12k, while the test set favoured the run's end at 18k.
# 1.8k pairs get 8-9 epochs, 50k one.
AUTO_EPOCH_SAMPLES = {1: 14_000, 2: 16_000}


def _settle_epochs(settings: Stage1Config | Stage2Config, number: int, train_set, accelerator: Accelerator) -> None:
    """Replace `stageN.epochs=auto` by a number from the training set's size, and say so."""
    if settings.epochs != "auto":
        return
    if isinstance(train_set, StreamingBatches):
        raise QVLMError(f"stage{number}.epochs=auto counts the training samples, which a stream (train.stream="
                        f"true) does not; a stream stops at stage{number}.max_steps: set a number of epochs")
    target = AUTO_EPOCH_SAMPLES[number]
    settings.epochs = max(1, round(target / len(train_set)))
    accelerator.print(f"stage{number}.epochs=auto: {settings.epochs} epoch(s) of {len(train_set):,} samples "
                      f"(about {target:,} samples seen)")


def answer_token_counts(answers: list[str], tokenizer) -> list[int]:
    """Each answer's length in the LM's tokens (no special tokens), sorted."""
    return sorted(len(ids) for ids in tokenizer(answers, add_special_tokens=False).input_ids)


def percentile(sorted_counts: list[int], q: float) -> int:
    """The smallest count at or above a fraction `q` of `sorted_counts` (nearest rank)."""
    return sorted_counts[math.ceil(q * len(sorted_counts)) - 1]


def answer_lengths(counts: list[int], cap: int | None) -> str:
    """What `stage2.max_answer_tokens` does to this data, said before training: the answers' token
    counts (sorted: median, 99th percentile, longest), how many the cap cuts, and the cap that keeps
    99% whole."""
    p99 = percentile(counts, 0.99)
    note = (f"answers: {counts[len(counts) // 2]} tokens at the median, {p99} at the 99th percentile, "
            f"{counts[-1]} the longest; stage2.max_answer_tokens={cap}")
    cut = sum(n > cap for n in counts) if cap is not None else 0
    if not cut:
        return note + ": none cut"
    note += f" cuts {cut:,} of {len(counts):,} ({cut / len(counts):.1%}), trained without their EOS"
    return note + (f"; --set stage2.max_answer_tokens={p99} keeps 99% whole" if p99 > cap else "")


def _described(train_set: InstructionDataset) -> str:
    questions = sum(entry.is_question for entry in train_set.entries)
    return (f"lm.describe_first: {questions - train_set.undescribed:,} of {questions:,} questions train behind "
            "a caption of their image" + (f"; {train_set.undescribed:,} have none and train without: the model "
                                          "describes every image before answering, so give each question's "
                                          "image a caption" if train_set.undescribed else ""))


def stage2_model(config: QVLMConfig, init: str | None) -> QVLM:
    """A stage-2 model whose Q-Former comes from the stage-1 run `init` (fresh without it), after
    checking that run used the same vision / Q-Former settings."""
    if init is None:
        return QVLM.build(config, stage=2)
    folder = model_folder(init)
    trained_with = read_config(folder)[0]
    # The encoder's arithmetic (`vision.precision`) may differ: same weights, features within ~1%;
    # instruction awareness is a stage-2 choice (stage 1 trains the same Q-Former weights either way).
    trained_with.vision.precision = config.vision.precision
    trained_with.qformer.instruction_aware = config.qformer.instruction_aware
    mismatch = [f"{part}.{key} (--init: {theirs!r}, here: {getattr(getattr(config, part), key)!r})"
                for part in ("vision", "qformer")
                for key, theirs in asdict(getattr(trained_with, part)).items()
                if theirs != getattr(getattr(config, part), key)]
    if mismatch:
        raise QVLMError(f"--init {init} was trained with a different vision / Q-Former config: "
                        f"{'; '.join(mismatch)}. Stage 2 must use the stage-1 run's settings: train with "
                        f"--config {folder / 'config.json'} (or the same --preset and --set as stage 1)")
    model = QVLM.build(config, stage=2)
    # Only the Q-Former comes from stage 1 (the vision encoder is the same frozen one).
    weights = read_trainable(folder)
    model.qformer.load_state_dict({k.removeprefix("qformer."): v for k, v in weights.items()
                                   if k.startswith("qformer.")})
    return model


def _datasets(config: QVLMConfig, number: int, data: str, val: str | None, model: QVLM,
              accelerator: Accelerator, make: Callable[..., Dataset]) -> tuple[Dataset, Dataset | None]:
    """The training set (a list, or a stream with `train.stream`) and the validation set, features from
    the cache or online (`train.features`): `data.pipeline.training_data`."""
    prepared = training_data(config, number, data, val, model.vision, make, accelerator)
    return prepared.train_set, prepared.val_set


def _equal_lengths(train_set) -> list[int]:
    """Random batches: every sample of a list the same length; a stream has no lengths (nor batches to group)."""
    return [0] * len(train_set) if not isinstance(train_set, StreamingBatches) else []


class AnswerStats:
    """Stage 2's counts: padding in this process's batches since the last log line (`pad_fraction`),
    and answers cut at `stage2.max_answer_tokens` over the run (trained without their EOS)."""

    def __init__(self, eos_token_id: int, cap: int | None):
        self.eos_token_id, self.cap = eos_token_id, cap
        self.padded = self.positions = self.cut = self.answers = 0

    def count(self, batch: dict) -> None:
        self.padded += int((batch["attention_mask"] == 0).sum())
        self.positions += batch["attention_mask"].numel()
        self.cut += truncated_answers(batch["labels"], self.eos_token_id)
        self.answers += len(batch["labels"])

    def log_fields(self) -> dict:
        """The padding fraction since the last call (one call per log line)."""
        fields = {"pad_fraction": round(self.padded / self.positions, 4)} if self.positions else {}
        self.padded = self.positions = 0
        return fields

    def report(self, accelerator: Accelerator) -> dict:
        """How many answers of all processes were cut; said aloud when any were."""
        counts = accelerator.reduce(torch.tensor([self.cut, self.answers], device=accelerator.device), "sum")
        cut, answers = (int(x) for x in counts)
        if cut:
            accelerator.print(f"{cut} of {answers} answers trained on ({cut / answers:.1%}) were cut at "
                              f"stage2.max_answer_tokens={self.cap} and trained without EOS; raise it to keep them whole")
        return {"truncated_answers": cut, "answers": answers}


def _generation_scores(model: QVLM, val_set: InstructionDataset, collate, batch_size: int, device,
                       batches: int) -> dict:
    """Generate for the first VQA samples and for one caption prompt per image of the first images,
    `batches` batches in all, shared by the kinds present (generation is validation's slow part).
    `val_vqa_accuracy` is exact match; exact match on a caption reads ~0 however good it is, so
    captions are scored against all of their image's captions instead (`val_caption_cider`, `_bleu4`)."""
    vqa = [i for i, e in enumerate(val_set.entries) if e.is_question]
    references: dict[str, list[str]] = {}
    one_per_image = []
    for i, e in enumerate(val_set.entries):
        if not e.is_question:
            if e.image_key not in references:
                one_per_image.append(i)
            references.setdefault(e.image_key, []).append(e.answer)
    per_kind = max(1, batches // max(1, bool(vqa) + bool(one_per_image))) * batch_size
    result = {}
    if vqa:
        preds, items = _generate(model, Subset(val_set, vqa[:per_kind]), collate, batch_size, device)
        hits = sum(exact_match(p, a) for p, a in zip(preds, items["answers"], strict=True))
        result["val_vqa_accuracy"] = round(hits / max(1, len(preds)), 4)
    if one_per_image and has_caption_metrics():
        preds, items = _generate(model, Subset(val_set, one_per_image[:per_kind]), collate, batch_size, device)
        keys = items["image_keys"]
        scores = caption_scores(dict(zip(keys, preds, strict=True)), {k: references[k] for k in keys})
        result["val_caption_cider"] = round(scores["cider"], 4)
        result["val_caption_bleu4"] = round(scores["bleu4"], 4)
    return result


def has_caption_metrics() -> bool:
    """pycocoevalcap (the `qvlm[eval]` extra) scores captions; without it captions get their loss only."""
    return importlib.util.find_spec("pycocoevalcap") is not None


def _generate(model: QVLM, samples, collate, batch_size: int, device) -> tuple[list[str], dict]:
    """Greedy answers for `samples`, with the samples' target answers and image keys (lists)."""
    preds, items = [], {"answers": [], "image_keys": []}
    for batch in DataLoader(samples, batch_size=batch_size, collate_fn=collate, shuffle=False):
        if not batch:
            continue
        # as long as a trained answer can be; with no cap (the article's), the decoding default
        longest = model.config.stage2.max_answer_tokens or model.config.generation.max_new_tokens or 32
        # greedy whatever the config's `generation` section says: validation scores must be reproducible
        # what users ask (with lm.describe_first, the model describes the image itself, as at inference)
        preds += model.generate_from_features(batch["features"].to(device), batch["user_texts"], max_new_tokens=longest,
                                              temperature=0.0, num_beams=1)
        for key in items:
            items[key] += batch[key]
    return preds, items

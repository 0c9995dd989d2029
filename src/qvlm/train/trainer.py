"""Both training stages as one plain loop, read top to bottom in `train()`.

Stage 1 aligns the Q-Former with text (ITC, optionally ITM and ITG); stage 2 trains adapter + LoRA (and
optionally the Q-Former) to generate answers. Accelerate handles devices, mixed precision and
multi-process data parallelism (`accelerate launch --num_processes N qvlm train ...`).

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation cut into global
batches (grouped by length in stage 2), each process taking its slice. That makes `--resume` exact (skip the batches already done) and
makes N processes see every sample once per epoch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from qvlm.config import QVLMConfig
from qvlm.console import progress
from qvlm.data.cache import FeatureCache
from qvlm.data.collate import LengthGroupedBatchSampler, Stage1Collator, Stage2Collator, positive_pairs
from qvlm.data.datasets import CaptionDataset, InstructionDataset
from qvlm.data.images import SkipCounter
from qvlm.data.records import read_records
from qvlm.data.sequences import truncated_answers
from qvlm.errors import QVLMError
from qvlm.eval.metrics import caption_scores, exact_match
from qvlm.models.vlm import QVLM, WEIGHTS_FILE, model_folder
from qvlm.train import precision
from qvlm.train.best import BestModel, keep_best
from qvlm.train.budget import TimeBudget, planned_total, save_plan
from qvlm.train.checkpoint import Position, drop_metrics_after, resume_latest, save_checkpoint
from qvlm.train.optim import (
    make_optimizer,
    redraw_schedule,
    stage1_param_groups,
    stage2_param_groups,
    warmup_cosine,
)
from qvlm.utils import cache_home


class Stage1Objective(nn.Module):
    """The Q-Former's three objectives as one forward, so DDP sees (and syncs) every gradient."""

    def __init__(self, model: QVLM, config: QVLMConfig):
        super().__init__()
        self.qformer = model.qformer
        self.tokenizer = model.text_tokenizer
        self.weights = config.stage1
        self.max_len = config.qformer.max_text_len

    def forward(self, features: torch.Tensor, captions: list[str], image_keys: list[str]) -> dict:
        """features [b, P, Dv] and b captions of this process -> {"loss", "itc", ["itm"], ["itg"], "r1"}.

        With several processes, ITC contrasts this process's items against the whole global batch
        (embeddings gathered with gradients, as BLIP-2 does), so N processes of batch b compute the
        same loss and gradient as one process of batch N*b. ITM and ITG stay within the local batch.
        """
        ids, mask, positives = self._text_side(captions, image_keys, features.device)  # [b, T] x2, [B, B]
        image_embeds = self.qformer.image_embeds(features)  # [b, Nq, E]
        text_embeds = self.qformer.text_embeds(ids, mask)  # [b, E]
        all_images, offset = _gather_with_grad(image_embeds)  # [B, Nq, E]
        all_texts, _ = _gather_with_grad(text_embeds)  # [B, E]
        local = slice(offset, offset + len(captions))
        positives = positives[local]  # [b, B]
        sim_i2t = self.qformer.similarity(image_embeds, all_texts)  # [b, B]
        sim_t2i = self.qformer.similarity(all_images, text_embeds).t()  # [b, B]
        losses = {"itc": self.qformer.itc_loss(sim_i2t, sim_t2i, positives)}
        if self.weights.itm_weight > 0:
            losses["itm"] = self.qformer.itm_loss(features, ids, mask, sim_i2t[:, local].detach(),
                                                  positives[:, local])
        if self.weights.itg_weight > 0:
            losses["itg"] = self.qformer.itg_loss(features, ids, mask)
        w = {"itc": self.weights.itc_weight, "itm": self.weights.itm_weight, "itg": self.weights.itg_weight}
        losses["loss"] = sum(w[k] * v for k, v in losses.items())
        # image->text R@1 over the global batch: is the best-scoring caption a true pair?
        losses["r1"] = positives.gather(1, sim_i2t.argmax(1, keepdim=True)).float().mean().detach()
        return losses

    @torch.compiler.disable  # string work: traced, every new caption would trigger a recompile
    def _text_side(self, captions: list[str], image_keys: list[str], device) -> tuple:
        """Token ids and mask [b, T] of this process's captions; which items of the global batch are
        true pairs [B, B] (repeated captions and several captions of one image count)."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt").to(device)
        positives = positive_pairs(_gather_objects(captions), _gather_objects(image_keys))
        return tokens.input_ids, tokens.attention_mask, positives.to(device)


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
    if not _distributed():
        return local
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return [x for part in parts for x in part]


class MetricsLog:
    """JSONL (one object a line) + TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{record['stage']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _multi_cpu() -> bool:
    """Under torchrun without a GPU, Accelerate starts gloo data parallelism only when told `cpu=True`."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_model(config: QVLMConfig, stage: int, init: Path | None) -> QVLM:
    """Stage 1 builds the Q-Former from its pretrained text encoder; stage 2 starts from a stage-1 run."""
    if stage == 1:
        return QVLM.build(config, stage=1)
    if init is None:
        return QVLM.build(config, stage=2)
    folder = model_folder(init)
    trained_with = QVLMConfig.load(folder / "config.json")
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
    weights = load_file(folder / WEIGHTS_FILE)
    model.qformer.load_state_dict({k.removeprefix("qformer."): v for k, v in weights.items()
                                   if k.startswith("qformer.")})
    return model


def _datasets(config: QVLMConfig, stage: int, data: str, val: str | None, cache: FeatureCache,
              accelerator: Accelerator):
    """Build the feature cache (main process first; the others then just read it) and the datasets."""
    # Malformed manifest lines are counted with the samples, so they show in the report and the check
    skips = SkipCounter("samples")
    train_records = list(read_records(data, skips=skips))
    val_records = list(read_records(val)) if val else []
    with accelerator.main_process_first():
        image_skips = cache.build(train_records + val_records, progress=accelerator.is_main_process)
        cache.encoder = None  # reading needs no encoder; keeps DataLoader workers light
    accelerator.print(f"{cache.summary()}; {image_skips.summary()}")
    if stage == 1:
        make = lambda records, skips=None: CaptionDataset(records, cache=cache, skips=skips)  # noqa: E731
    else:
        make = lambda records, skips=None: InstructionDataset(records, cache=cache, seed=config.train.seed,  # noqa: E731
                                                              skips=skips)
    train_set = make(train_records, skips)
    accelerator.print(f"training data: {skips.report()}")
    train_set.check(config.train.max_bad_fraction)
    return train_set, (make(val_records) if val_records else None)


def train(config: QVLMConfig, stage: int, data: str, out: str | Path, val: str | None = None,
          init: str | Path | None = None, resume: bool = False) -> Path:
    """Train one stage; the final model lands in `out/model` (loadable with `QVLM.from_pretrained`)."""
    out = Path(out)
    s = config.stage1 if stage == 1 else config.stage2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = precision.resolve(s.mixed_precision, device)
    # Accelerate keeps one precision per process; the demo trains both stages in one process, and each
    # stage may choose its own. This forgets the last choice, not the distributed setup.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="no" if mixed_precision == "fp32" else mixed_precision,
                              cpu=_multi_cpu(), dynamo_backend="inductor" if config.train.compile else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    best = keep_best(config.train.keep_best, out, stage, val is not None, resume)  # checked before any work
    _prepare_run_folder(out, config, stage, resume, accelerator)
    accelerator.print(precision.explain(s.mixed_precision, device, f"stage{stage}.mixed_precision"))
    set_seed(config.train.seed)

    # Model, feature cache, data
    model = build_model(config, stage, Path(init) if init else None).to(accelerator.device)
    if stage == 2 and mixed_precision == "bf16":
        precision.store_frozen_in(model.lm, torch.bfloat16)
    cache = FeatureCache(config.train.feature_cache or cache_home() / "features", model.vision)
    train_set, val_set = _datasets(config, stage, data, val, cache, accelerator)
    # Stage 2 groups samples of similar length (less padding; `train.group_by_length`); stage 1 keeps
    # batches random, since grouping captions by length would make contrastive negatives easier.
    lengths = train_set.lengths() if stage == 2 and config.train.group_by_length else [0] * len(train_set)
    sampler = LengthGroupedBatchSampler(lengths, s.batch_size, seed=config.train.seed, drop_last=True,
                                        rank=accelerator.process_index, world_size=accelerator.num_processes)
    if len(sampler) == 0:
        raise QVLMError(f"{len(train_set)} training samples make no full batch of "
                        f"{s.batch_size * accelerator.num_processes}; lower stage{stage}.batch_size")
    if stage == 1:
        objective, collate = Stage1Objective(model, config), Stage1Collator()
    else:
        objective = model
        collate = Stage2Collator(model.tokenizer, config.qformer.num_queries, config.lm.image_position,
                                 config.lm.system_prompt, s.max_answer_tokens,
                                 qformer_tokenizer=model.text_tokenizer if config.qformer.instruction_aware else None,
                                 qformer_max_len=config.qformer.max_text_len)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                        num_workers=config.train.num_workers, pin_memory=torch.cuda.is_available())

    # Optimizer and schedule
    groups = stage1_param_groups(model, config) if stage == 1 else stage2_param_groups(model, config)
    optimizer = make_optimizer(groups)
    steps_per_epoch = -(-len(sampler) // s.grad_accum)  # the epoch's last step takes the remainder
    total_steps = (planned_total(out) if resume else None) or s.max_steps or steps_per_epoch * s.epochs
    scheduler = warmup_cosine(optimizer, s.warmup_steps, total_steps)
    wrapped, optimizer = accelerator.prepare(objective, optimizer)

    position = Position()
    checkpoints = out / "checkpoints"
    resumed = resume_latest(checkpoints, model, optimizer, scheduler) if resume else None
    last = resumed[0] if resumed else None
    if resumed is not None:
        position = resumed[1]
        accelerator.print(f"resumed from {last} (step {position.step}, epoch {position.epoch})")
    if resume and accelerator.is_main_process:
        drop_metrics_after(out / "metrics.jsonl", position.step)  # the steps after it are trained again

    log = MetricsLog(out, accelerator.is_main_process)
    bar = progress(total=total_steps, initial=position.step, disable=not accelerator.is_main_process,
                   desc=f"stage {stage}")
    samples, padded, positions, tick = 0, 0, 0, time.perf_counter()
    cut, answers = 0, 0  # stage 2: answers cut at max_answer_tokens, of all answers trained on
    last_good = last
    budget = TimeBudget(s.time_budget_s, total_steps) if s.time_budget_s and not planned_total(out) else None
    while position.step < total_steps and position.epoch < s.epochs:
        sampler.set_epoch(position.epoch)
        sampler.skip = position.batch_in_epoch
        if stage == 2:
            train_set.set_epoch(position.epoch)
        model.train()
        for batch in loader:
            position.batch_in_epoch += 1
            if not batch:
                continue  # every item of the batch failed to load (counted by the dataset)
            with precision.attention_kernels(accelerator.device, mixed_precision, stage):
                out_losses = _step_loss(wrapped, batch, stage, accelerator.device)
            step_size, ends_step = _accumulation(position.batch_in_epoch, len(sampler), s.grad_accum)
            loss = out_losses["loss"] / step_size
            if not torch.isfinite(loss):
                raise QVLMError(f"loss became {loss.item()} at step {position.step}; stopped. Last good "
                                f"checkpoint: {last_good or 'none'}. Lower the learning rate or check the data.")
            accelerator.backward(loss)
            samples += len(batch["features"]) * accelerator.num_processes
            if stage == 2:
                padded += int((batch["attention_mask"] == 0).sum())
                positions += batch["attention_mask"].numel()
                cut += truncated_answers(batch["labels"], model.tokenizer.eos_token_id)
                answers += len(batch["labels"])
            if not ends_step:
                continue
            grad_norm = None
            if s.grad_clip:
                grad_norm = accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], s.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            bar.update(1)
            if budget is not None and (fitted := budget.after_step(position.step)) is not None:
                fitted = broadcast_object_list([fitted])[0]  # every process trains the main one's plan
                if fitted < total_steps:
                    total_steps = _fit_to_budget(budget, fitted, scheduler, s, stage, out, accelerator, bar)
            if position.step % config.train.log_every == 0 or position.step == total_steps:
                elapsed = time.perf_counter() - tick
                # mean over processes, so the log shows the global batch's loss
                means = accelerator.reduce(torch.stack([v.detach().float() for v in out_losses.values()]), "mean")
                record = {"stage": f"stage{stage}", "step": position.step, "epoch": position.epoch,
                          **{k: round(float(v), 5) for k, v in zip(out_losses, means, strict=True)},
                          "lr": scheduler.get_last_lr()[-1], "samples_per_s": round(samples / elapsed, 2)}
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 6)
                if positions:
                    record["pad_fraction"] = round(padded / positions, 4)  # this process's batches
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                sps=f"{record['samples_per_s']:.1f}")
                samples, padded, positions, tick = 0, 0, 0, time.perf_counter()
            if val_set is not None and position.step % config.train.eval_every == 0:
                _validation(log, best, wrapped, model, val_set, collate, stage, s.batch_size, accelerator,
                            position.step)
                model.train()
            if position.step % config.train.save_every == 0 and position.step < total_steps:
                last_good = _save(accelerator, checkpoints, model, optimizer, scheduler, position)
            if position.step >= total_steps:
                break
        else:
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0
            continue
        break
    bar.close()
    if val_set is not None and position.step % config.train.eval_every:
        _validation(log, best, wrapped, model, val_set, collate, stage, s.batch_size, accelerator, position.step)
    if stage == 2:
        _report_truncation(log, accelerator, cut, answers, s.max_answer_tokens, position.step)
    _save(accelerator, checkpoints, model, optimizer, scheduler, position)
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    log.close()
    accelerator.wait_for_everyone()
    return out / "model"


def _accumulation(batch_in_epoch: int, batches: int, grad_accum: int) -> tuple[int, bool]:
    """How many micro-batches make the optimizer step that micro-batch `batch_in_epoch` (1-based) of
    `batches` belongs to, and whether it is that step's last one. Steps never span epochs: the epoch's
    last `batches % grad_accum` micro-batches make one smaller step, their losses averaged over that
    many, so every step is the mean gradient of the micro-batches in it."""
    remainder = batches % grad_accum
    in_remainder = remainder and batch_in_epoch > batches - remainder
    return (remainder if in_remainder else grad_accum), (batch_in_epoch % grad_accum == 0
                                                          or batch_in_epoch == batches)


def _fit_to_budget(budget: TimeBudget, fitted: int, scheduler, s, stage: int, out: Path, accelerator,
                   bar) -> int:
    """Train `fitted` steps instead of the plan's, over a redrawn schedule; say so and remember it."""
    accelerator.print(f"\nstage {stage}: {budget.seconds_per_step:.2f} s/step here; {budget.total_steps} steps "
                      f"would overrun stage{stage}.time_budget_s={s.time_budget_s:g}: training {fitted} steps")
    redraw_schedule(scheduler, s.warmup_steps, fitted)
    if accelerator.is_main_process:
        save_plan(out, fitted, budget.seconds_per_step, s.time_budget_s)
    bar.total = fitted
    return fitted


def _step_loss(wrapped, batch: dict, stage: int, device) -> dict:
    features = batch["features"].to(device, non_blocking=True)
    if stage == 1:
        return wrapped(features, batch["captions"], batch["image_keys"])
    qformer_text = {k: v.to(device) for k, v in batch.items() if k.startswith("qformer_")}  # instruction-aware
    out = wrapped(features, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                  batch["image_mask"].to(device), batch["labels"].to(device), **qformer_text)
    return {"loss": out.loss}


def _validation(log: MetricsLog, best: BestModel | None, wrapped, model: QVLM, val_set, collate, stage: int,
                batch_size: int, accelerator, step: int) -> dict:
    """Validate, log the metrics and keep the best model so far in RUN/best (`train.keep_best`)."""
    metrics = validate(wrapped, model, val_set, collate, stage, batch_size, accelerator)
    log.write({"stage": f"stage{stage}", "step": step, **metrics})
    if best is not None and accelerator.is_main_process and best.update(model, metrics, step):
        accelerator.print(f"step {step}: best {best.metric} so far ({metrics[best.metric]}), saved to {best.folder}")
    accelerator.wait_for_everyone()
    return metrics


def _report_truncation(log: MetricsLog, accelerator, cut: int, answers: int, cap: int | None, step: int) -> None:
    """Say how many answers were cut at stage2.max_answer_tokens (trained without their EOS)."""
    counts = accelerator.reduce(torch.tensor([cut, answers], device=accelerator.device), "sum")
    cut, answers = (int(x) for x in counts)
    log.write({"stage": "stage2", "step": step, "truncated_answers": cut, "answers": answers})
    if cut:
        accelerator.print(f"{cut} of {answers} answers trained on ({cut / answers:.1%}) were cut at "
                          f"stage2.max_answer_tokens={cap} and trained without EOS; raise it to keep them whole")


@torch.no_grad()
def validate(wrapped, model: QVLM, val_set, collate, stage: int, batch_size: int, accelerator,
             max_batches: int = 20, generate_batches: int = 4) -> dict:
    """Validation loss on up to `max_batches` batches, plus retrieval R@1 within batches (stage 1) or
    scores of greedy generations on `generate_batches` batches (stage 2): `val_vqa_accuracy` (exact
    match) on VQA samples, `val_caption_cider` and `val_caption_bleu4` on captions."""
    model.eval()
    loader = DataLoader(val_set, batch_size=batch_size, collate_fn=collate, shuffle=False)
    losses, hits, total = [], 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches or not batch:
            break
        out = _step_loss(wrapped, batch, stage, accelerator.device)
        losses.append(out["loss"].item())
        if stage == 1:
            hits += out["r1"].item() * len(batch["features"])
            total += len(batch["features"])
    result = {"val_loss": round(sum(losses) / max(1, len(losses)), 5)}
    if stage == 1:
        result["val_r1"] = round(hits / max(1, total), 4)
    else:
        result.update(_generation_scores(model, val_set, collate, batch_size, accelerator.device, generate_batches))
    return result


def _generation_scores(model: QVLM, val_set: InstructionDataset, collate, batch_size: int, device,
                       batches: int) -> dict:
    """Generate for the first VQA samples and for one caption prompt per image of the first images,
    `batches` batches in all, shared by the kinds present (generation is validation's slow part).
    Exact match on a caption reads ~0 however good it is: captions are scored against all of their
    image's captions instead."""
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
        preds += model.generate_from_features(batch["features"].to(device), batch["prompts"],
                                              max_new_tokens=model.config.stage2.max_answer_tokens)
        for key in items:
            items[key] += batch[key]
    return preds, items


def _save(accelerator, folder: Path, model, optimizer, scheduler, position: Position) -> Path | None:
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(folder, model, optimizer, scheduler, Position(**vars(position)))
    accelerator.wait_for_everyone()
    return path


def _prepare_run_folder(out: Path, config: QVLMConfig, stage: int, resume: bool, accelerator) -> None:
    if accelerator.is_main_process:
        if (out / "model").exists() and not resume:
            raise QVLMError(f"{out} already holds a trained model; choose another --out or pass --resume")
        if (out / "checkpoints").exists() and not resume:
            raise QVLMError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it")
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
        (out / "run.json").write_text(json.dumps({"stage": stage}) + "\n")
    accelerator.wait_for_everyone()


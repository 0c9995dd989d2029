"""Both training stages as one plain loop, read top to bottom in `train()`.

Stage 1 aligns the Q-Former with text (ITC, optionally ITM and ITG); stage 2 trains adapter + LoRA (and
optionally the Q-Former) to generate answers. Accelerate handles devices, mixed precision and
multi-process data parallelism (`accelerate launch --num_processes N qvlm train ...`).

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation cut into global
batches, each process taking its slice. That makes `--resume` exact (skip the batches already done) and
makes N processes see every sample once per epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from qvlm.config import QVLMConfig
from qvlm.data.cache import FeatureCache
from qvlm.data.collate import Stage1Collator, Stage2Collator
from qvlm.data.datasets import CaptionDataset, InstructionDataset
from qvlm.data.records import read_records
from qvlm.errors import QVLMError
from qvlm.eval.metrics import exact_match
from qvlm.models.vlm import QVLM, WEIGHTS_FILE, model_folder
from qvlm.train.checkpoint import Position, latest_checkpoint, load_checkpoint, save_checkpoint
from qvlm.train.optim import make_optimizer, stage1_param_groups, stage2_param_groups, warmup_cosine
from qvlm.utils import cache_home


class Stage1Objective(nn.Module):
    """The Q-Former's three objectives as one forward, so DDP sees (and syncs) every gradient."""

    def __init__(self, model: QVLM, config: QVLMConfig):
        super().__init__()
        self.qformer = model.qformer
        self.tokenizer = model.text_tokenizer
        self.weights = config.stage1
        self.max_len = config.qformer.max_text_len

    def forward(self, features: torch.Tensor, captions: list[str], positives: torch.Tensor) -> dict:
        """features [B, P, Dv], B captions, positives bool [B, B] -> {"loss", "itc", ["itm"], ["itg"]}."""
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt").to(features.device)
        ids, mask = tokens.input_ids, tokens.attention_mask
        sim = self.qformer.similarity(self.qformer.image_embeds(features), self.qformer.text_embeds(ids, mask))
        losses = {"itc": self.qformer.itc_loss(sim, positives)}
        if self.weights.itm_weight > 0:
            losses["itm"] = self.qformer.itm_loss(features, ids, mask, sim.detach(), positives)
        if self.weights.itg_weight > 0:
            losses["itg"] = self.qformer.itg_loss(features, ids, mask)
        w = {"itc": self.weights.itc_weight, "itm": self.weights.itm_weight, "itg": self.weights.itg_weight}
        losses["loss"] = sum(w[k] * v for k, v in losses.items())
        losses["r1"] = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean().detach()
        return losses


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded permutation per epoch, cut into global batches; this process yields its slice of each.
    `skip` batches at the start of the first epoch are left out (resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0
        self.global_batch = batch_size * world

    def __len__(self) -> int:
        return max(1, self.n // self.global_batch) - self.skip  # drop_last keeps every batch full

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.skip, max(1, self.n // self.global_batch)):
            start = b * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size]


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


def _mixed_precision(config: QVLMConfig, stage: int) -> str:
    choice = config.stage2.mixed_precision if stage == 2 else "auto"
    if choice == "auto":  # bf16 where the hardware has it; fp32 on CPU (bf16 autocast is slower there)
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return choice


def build_model(config: QVLMConfig, stage: int, init: Path | None) -> QVLM:
    """Stage 1 builds the Q-Former from its pretrained text encoder; stage 2 starts from a stage-1 run."""
    if stage == 1:
        return QVLM.build(config, stage=1)
    if init is None:
        return QVLM.build(config, stage=2)
    folder = model_folder(init)
    trained_with = QVLMConfig.load(folder / "config.json")
    mismatch = [part for part in ("vision", "qformer") if getattr(trained_with, part) != getattr(config, part)]
    if mismatch:
        raise QVLMError(f"--init {init} was trained with a different {' and '.join(mismatch)} config; "
                        "stage 2 must use the stage-1 run's vision encoder and Q-Former settings")
    model = QVLM.build(config, stage=2)
    # Only the Q-Former comes from stage 1 (the vision encoder is the same frozen one).
    weights = load_file(folder / WEIGHTS_FILE)
    model.qformer.load_state_dict({k.removeprefix("qformer."): v for k, v in weights.items()
                                   if k.startswith("qformer.")})
    return model


def _datasets(config: QVLMConfig, stage: int, data: str, val: str | None, cache: FeatureCache,
              accelerator: Accelerator):
    """Build the feature cache (main process first; the others then just read it) and the datasets."""
    train_records = list(read_records(data))
    val_records = list(read_records(val)) if val else []
    with accelerator.main_process_first():
        skips = cache.build(train_records + val_records, progress=accelerator.is_main_process)
        cache.encoder = None  # reading needs no encoder; keeps DataLoader workers light
    accelerator.print(f"{cache.summary()}; {skips.summary()}")
    if stage == 1:
        make = lambda records: CaptionDataset(records, cache=cache)  # noqa: E731
    else:
        make = lambda records: InstructionDataset(records, cache=cache, seed=config.train.seed)  # noqa: E731
    train_set = make(train_records)
    train_set.check(config.train.max_bad_fraction)
    return train_set, (make(val_records) if val_records else None)


def train(config: QVLMConfig, stage: int, data: str, out: str | Path, val: str | None = None,
          init: str | Path | None = None, resume: bool = False) -> Path:
    """Train one stage; the final model lands in `out/model` (loadable with `QVLM.from_pretrained`)."""
    out = Path(out)
    s = config.stage1 if stage == 1 else config.stage2
    accelerator = Accelerator(mixed_precision=_mixed_precision(config, stage),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    _prepare_run_folder(out, config, stage, resume, accelerator)
    set_seed(config.train.seed)

    # Model, feature cache, data
    model = build_model(config, stage, Path(init) if init else None).to(accelerator.device)
    cache = FeatureCache(config.train.feature_cache or cache_home() / "features", model.vision)
    train_set, val_set = _datasets(config, stage, data, val, cache, accelerator)
    sampler = EpochBatchSampler(len(train_set), s.batch_size, config.train.seed,
                                accelerator.process_index, accelerator.num_processes)
    if stage == 1:
        objective, collate = Stage1Objective(model, config), Stage1Collator()
    else:
        objective = model
        collate = Stage2Collator(model.tokenizer, config.qformer.num_queries, config.lm.image_position,
                                 config.lm.system_prompt, s.max_answer_tokens)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                        num_workers=config.train.num_workers, pin_memory=torch.cuda.is_available())

    # Optimizer and schedule
    groups = stage1_param_groups(model, config) if stage == 1 else stage2_param_groups(model, config)
    optimizer = make_optimizer(groups)
    steps_per_epoch = max(1, len(sampler) // s.grad_accum)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    scheduler = warmup_cosine(optimizer, s.warmup_steps, total_steps)
    wrapped, optimizer = accelerator.prepare(objective, optimizer)

    position = Position()
    checkpoints = out / "checkpoints"
    last = latest_checkpoint(checkpoints) if resume else None
    if last is not None:
        position = load_checkpoint(last, model, optimizer, scheduler)
        accelerator.print(f"resumed from {last} (step {position.step}, epoch {position.epoch})")

    log = MetricsLog(out, accelerator.is_main_process)
    bar = tqdm(total=total_steps, initial=position.step, disable=not accelerator.is_main_process,
               desc=f"stage {stage}", dynamic_ncols=True)
    samples, tick = 0, time.perf_counter()
    last_good = last
    while position.step < total_steps and position.epoch < s.epochs:
        sampler.epoch, sampler.skip = position.epoch, position.batch_in_epoch
        if stage == 2:
            train_set.set_epoch(position.epoch)
        model.train()
        for batch in loader:
            position.batch_in_epoch += 1
            if not batch:
                continue  # every item of the batch failed to load (counted by the dataset)
            out_losses = _step_loss(wrapped, batch, stage, accelerator.device)
            loss = out_losses["loss"] / s.grad_accum
            if not torch.isfinite(loss):
                raise QVLMError(f"loss became {loss.item()} at step {position.step}; stopped. Last good "
                                f"checkpoint: {last_good or 'none'}. Lower the learning rate or check the data.")
            accelerator.backward(loss)
            samples += len(batch["features"]) * accelerator.num_processes
            if position.batch_in_epoch % s.grad_accum:
                continue
            if s.grad_clip:
                accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], s.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            bar.update(1)
            if position.step % config.train.log_every == 0 or position.step == total_steps:
                elapsed = time.perf_counter() - tick
                record = {"stage": f"stage{stage}", "step": position.step, "epoch": position.epoch,
                          **{k: round(float(v.detach()), 5) for k, v in out_losses.items()},
                          "lr": scheduler.get_last_lr()[-1], "samples_per_s": round(samples / elapsed, 2)}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                sps=f"{record['samples_per_s']:.1f}")
                samples, tick = 0, time.perf_counter()
            if val_set is not None and position.step % config.train.eval_every == 0:
                log.write({"stage": f"stage{stage}", "step": position.step,
                           **validate(wrapped, model, val_set, collate, stage, s.batch_size, accelerator)})
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
        log.write({"stage": f"stage{stage}", "step": position.step,
                   **validate(wrapped, model, val_set, collate, stage, s.batch_size, accelerator)})
    _save(accelerator, checkpoints, model, optimizer, scheduler, position)
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    log.close()
    accelerator.wait_for_everyone()
    return out / "model"


def _step_loss(wrapped, batch: dict, stage: int, device) -> dict:
    features = batch["features"].to(device, non_blocking=True)
    if stage == 1:
        positives = (batch["same_caption"] | batch["same_image"]).to(device)
        return wrapped(features, batch["captions"], positives)
    out = wrapped(features, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                  batch["image_mask"].to(device), batch["labels"].to(device))
    return {"loss": out.loss}


@torch.no_grad()
def validate(wrapped, model: QVLM, val_set, collate, stage: int, batch_size: int, accelerator,
             max_batches: int = 20) -> dict:
    """Validation loss, plus retrieval R@1 within batches (stage 1) or answer accuracy (stage 2)."""
    model.eval()
    loader = DataLoader(val_set, batch_size=batch_size, collate_fn=collate, shuffle=False)
    losses, hits, total = [], 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches or not batch:
            break
        out = _step_loss(wrapped, batch, stage, accelerator.device)
        losses.append(out["loss"].item())
        n = len(batch["features"])
        if stage == 1:
            hits += out["r1"].item() * n
        elif i < 4:  # generation is slow: accuracy on the first few batches only
            preds = model.generate_from_features(batch["features"].to(accelerator.device), batch["prompts"],
                                                 max_new_tokens=model.config.stage2.max_answer_tokens)
            hits += sum(exact_match(p, a) for p, a in zip(preds, batch["answers"], strict=True))
        total += n if (stage == 1 or i < 4) else 0
    result = {"val_loss": round(sum(losses) / max(1, len(losses)), 5)}
    result["val_r1" if stage == 1 else "val_accuracy"] = round(hits / max(1, total), 4)
    return result


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


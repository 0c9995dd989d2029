"""Both training stages through one flat loop: `train()` sets a run up, `_train_epochs()` and
`_micro_step()` run it, `_after_step()` logs, validates and saves.

What differs between the stages (model, objective, datasets, collator, parameter groups, per-batch
statistics, validation metrics, the report after training) is described once per stage in
`train/stages.py`. Accelerate handles devices, mixed precision and multi-process data parallelism
(`accelerate launch --num_processes N qvlm train ...`).

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation cut into global
batches (grouped by length in stage 2), each process taking its slice. That makes `--resume` exact (skip the batches already done) and
makes N processes see every sample once per epoch. A stream (`train.stream`) has no length: it runs
`max_steps` steps, and checkpoints keep every reader's position so that `--resume` is exact there too.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader

from qvlm import precision
from qvlm.config import QVLMConfig, TrainConfig
from qvlm.console import progress
from qvlm.data.collate import LengthGroupedBatchSampler
from qvlm.data.pipeline import require_max_steps
from qvlm.data.stream import StreamingBatches, StreamPosition
from qvlm.errors import QVLMError
from qvlm.models.objectives import ObjectiveOutput
from qvlm.train import stages
from qvlm.train.best import BestModel, keep_best
from qvlm.train.budget import TimeBudget, planned_total, save_plan
from qvlm.train.checkpoint import Position, drop_metrics_after, resume_latest, save_checkpoint
from qvlm.train.optim import build_optimizer, build_schedule, redraw_schedule
from qvlm.train.stages import Stage


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


@dataclass
class _Run:
    """What the loop carries from step to step of one stage's training run."""

    stage: Stage
    accelerator: Accelerator
    mixed_precision: str  # resolved: "fp32", "bf16" or "fp16"
    train: TrainConfig  # config.train: log_every, eval_every, save_every
    out: Path
    wrapped: nn.Module  # the stage's objective, prepared by Accelerate (DDP, compile, autocast)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: LengthGroupedBatchSampler | None  # None: a stream (`train.stream`)
    loader: DataLoader
    batches_per_epoch: int  # micro-batches of each process per epoch; 0: unknown (a stream)
    total_steps: int
    position: Position
    log: MetricsLog
    best: BestModel | None
    bar: object  # progress bar
    budget: TimeBudget | None
    last_good: Path | None  # the newest checkpoint
    stream: StreamPosition | None = None  # how far a stream has been read (this process's readers)
    samples: int = 0  # samples of all processes since the last log line
    tick: float = field(default_factory=time.perf_counter)  # when the last log line was written


def train(config: QVLMConfig, stage: int, data: str, out: str | Path, val: str | None = None,
          init: str | Path | None = None, resume: bool = False) -> Path:
    """Train one stage; the final model lands in `out/model` (loadable with `QVLM.from_pretrained`)."""
    out = Path(out)
    settings = getattr(config, f"stage{stage}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = precision.resolve(settings.mixed_precision, device)
    accelerator = _accelerator(config, mixed_precision)
    best = keep_best(config.train.keep_best, out, stage, val is not None, resume)  # checked before any work
    _prepare_run_folder(out, stage, resume, accelerator)
    accelerator.print(precision.explain(settings.mixed_precision, device, f"stage{stage}.mixed_precision"))
    set_seed(config.train.seed)
    described = stages.build(stage, config, data, val, Path(init) if init else None, accelerator, mixed_precision)
    if accelerator.is_main_process:  # RUN/config.json is the model's transformers config: Auto classes read RUN
        described.model.pretrained_config().to_json_file(out / "config.json")
    run = _start(described, config.train, out, resume, accelerator, mixed_precision, best)
    _train_epochs(run)
    run.bar.close()
    _finish(run)
    return out / "model"


def _accelerator(config: QVLMConfig, mixed_precision: str) -> Accelerator:
    # Accelerate keeps one precision per process; the demo trains both stages in one process, and each
    # stage may choose its own. This forgets the last choice, not the distributed setup.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision="no" if mixed_precision == "fp32" else mixed_precision,
                       cpu=_multi_cpu(), dynamo_backend="inductor" if config.train.compile else "no",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _start(stage: Stage, train: TrainConfig, out: Path, resume: bool, accelerator: Accelerator,
           mixed_precision: str, best: BestModel | None) -> _Run:
    """Batches, optimizer and schedule for `stage`; the checkpoint's position when resuming."""
    s = stage.settings
    sampler, loader = _batches(stage, train, accelerator)
    batches = len(sampler) if sampler is not None else 0

    # Optimizer and schedule
    groups = stage.param_groups
    optimizer = build_optimizer(groups, s)
    planned = (planned_total(out) if resume else None) or s.max_steps
    if sampler is None:  # a stream has no length: its schedule is drawn over max_steps
        total_steps = planned or require_max_steps(s.max_steps, stage.number)
    else:
        steps_per_epoch = -(-batches // s.grad_accum)  # the epoch's last step takes the remainder
        total_steps = planned or steps_per_epoch * s.epochs
    scheduler = build_schedule(optimizer, s, total_steps)
    wrapped, optimizer = accelerator.prepare(stage.objective, optimizer)

    position, last = _resume(out, stage.model, optimizer, scheduler, resume, accelerator)
    stream = None
    if sampler is None:  # the readers start where the checkpoint left them; the run counts on its own copy
        stage.train_set.set_state(StreamPosition.from_json(position.stream))
        stream = StreamPosition.from_json(position.stream)
    bar = progress(total=total_steps, initial=position.step, disable=not accelerator.is_main_process,
                   desc=f"stage {stage.number}")
    budget = TimeBudget(s.time_budget_s, total_steps) if s.time_budget_s and not planned_total(out) else None
    return _Run(stage, accelerator, mixed_precision, train, out, wrapped, optimizer, scheduler, sampler, loader,
                batches, total_steps, position, MetricsLog(out, accelerator.is_main_process), best, bar,
                budget, last, stream=stream)


def _batches(stage: Stage, train: TrainConfig, accelerator: Accelerator) -> tuple[LengthGroupedBatchSampler | None,
                                                                                  DataLoader]:
    """The batch sampler (None for a stream, which batches inside its DataLoader workers) and the loader."""
    pin = torch.cuda.is_available()
    if isinstance(stage.train_set, StreamingBatches):
        return None, stage.train_set.loader(stage.collate, train.num_workers, pin_memory=pin)
    s = stage.settings
    sampler = LengthGroupedBatchSampler(stage.lengths, s.batch_size, seed=train.seed, drop_last=True,
                                        rank=accelerator.process_index, world_size=accelerator.num_processes)
    if len(sampler) == 0:
        raise QVLMError(f"{len(stage.train_set)} training samples make no full batch of "
                        f"{s.batch_size * accelerator.num_processes}; lower stage{stage.number}.batch_size")
    return sampler, DataLoader(stage.train_set, batch_sampler=sampler, collate_fn=stage.collate,
                               num_workers=train.num_workers, pin_memory=pin)


def _resume(out: Path, model: nn.Module, optimizer, scheduler, resume: bool,
            accelerator: Accelerator) -> tuple[Position, Path | None]:
    """Where training starts: the newest good checkpoint's position (restored into model, optimizer and
    schedule) when resuming, else the beginning; and that checkpoint's path."""
    resumed = resume_latest(out / "checkpoints", model, optimizer, scheduler) if resume else None
    position, last = (resumed[1], resumed[0]) if resumed else (Position(), None)
    if resumed is not None:
        accelerator.print(f"resumed from {last} (step {position.step}, epoch {position.epoch})")
    if resume and accelerator.is_main_process:
        drop_metrics_after(out / "metrics.jsonl", position.step)  # the steps after it are trained again
    return position, last


def _train_epochs(run: _Run) -> None:
    """Epochs of micro-batches until the planned steps are done (or the epochs, if fewer)."""
    position, stage = run.position, run.stage
    if run.stream is not None:
        _train_stream(run)
        return
    while position.step < run.total_steps and position.epoch < stage.settings.epochs:
        run.sampler.set_epoch(position.epoch)
        run.sampler.skip = position.batch_in_epoch  # resuming mid-epoch
        stage.on_epoch(position.epoch)  # stage 2: redraw the caption prompts
        stage.model.train()
        for batch in run.loader:
            position.batch_in_epoch += 1
            if not batch:
                continue  # every item of the batch failed to load (counted by the dataset)
            if _micro_step(run, batch) and position.step >= run.total_steps:
                return
        position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def _train_stream(run: _Run) -> None:
    """Batches of an endless stream until the planned steps are done. `batch_in_epoch` counts the
    batches since the stream began (steps group `grad_accum` of them); `epoch` is the stream's
    slowest reader's."""
    if run.position.step >= run.total_steps:  # resumed from the last step's checkpoint: nothing left
        return
    run.stage.model.train()
    for batch in run.loader:
        run.stream.advance(batch)
        run.position.batch_in_epoch, run.position.epoch = run.stream.batches, run.stream.epoch
        if _micro_step(run, batch) and run.position.step >= run.total_steps:
            return


def _micro_step(run: _Run, batch: dict) -> bool:
    """Forward and backward one micro-batch; after a step's last one, step the optimizer (True then)."""
    stage, accelerator, position = run.stage, run.accelerator, run.position
    _encode_online(batch, stage.model, accelerator.device)
    with precision.attention_kernels(accelerator.device, run.mixed_precision, stage.number), \
            precision.lora_input_casts_off(stage.model, autocast=run.mixed_precision != "fp32"):
        output = run.wrapped(**_inputs(batch, stage.inputs, accelerator.device))
    step_size, ends_step = _accumulation(position.batch_in_epoch, run.batches_per_epoch, stage.settings.grad_accum)
    loss = output.loss / step_size
    if not torch.isfinite(loss):
        raise QVLMError(f"loss became {loss.item()} at step {position.step}; stopped. Last good "
                        f"checkpoint: {run.last_good or 'none'}. Lower the learning rate or check the data.")
    accelerator.backward(loss)
    run.samples += len(batch["features"]) * accelerator.num_processes
    stage.count(batch)
    if ends_step:
        _after_step(run, output, _optimizer_step(run))
    return ends_step


@torch.no_grad()
def _encode_online(batch: dict, model: nn.Module, device: torch.device) -> None:
    """`train.features=online`: the frozen encoder turns the batch's pixel_values [B, 3, H, W] into
    features [B, P, Dv] on the accelerator, in place of the cached ones."""
    if "pixel_values" in batch:
        batch["features"] = model.vision(batch.pop("pixel_values").to(device, non_blocking=True))


def _optimizer_step(run: _Run) -> torch.Tensor | None:
    """Clip (when set), step optimizer and schedule; the gradient norm before clipping, if measured."""
    s = run.stage.settings
    grad_norm = None
    if s.grad_clip:
        grad_norm = run.accelerator.clip_grad_norm_([p for g in run.stage.param_groups for p in g["params"]],
                                                    s.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _accumulation(batch_in_epoch: int, batches: int, grad_accum: int) -> tuple[int, bool]:
    """How many micro-batches make the optimizer step that micro-batch `batch_in_epoch` (1-based) of
    `batches` belongs to, and whether it is that step's last one. Steps never span epochs: the epoch's
    last `batches % grad_accum` micro-batches make one smaller step, their losses averaged over that
    many, so every step is the mean gradient of the micro-batches in it."""
    remainder = batches % grad_accum
    in_remainder = remainder and batch_in_epoch > batches - remainder
    return (remainder if in_remainder else grad_accum), (batch_in_epoch % grad_accum == 0
                                                          or batch_in_epoch == batches)


def _after_step(run: _Run, output: ObjectiveOutput, grad_norm: torch.Tensor | None) -> None:
    """Count the step; fit the plan to the time budget; log, validate and save when due."""
    position, train = run.position, run.train
    position.step += 1
    run.bar.update(1)
    if run.budget is not None and (fitted := run.budget.after_step(position.step)) is not None:
        fitted = broadcast_object_list([fitted])[0]  # every process trains the main one's plan
        _fit_to_budget(run, fitted)
    if position.step % train.log_every == 0 or position.step == run.total_steps:
        _log_step(run, output, grad_norm)
    if run.stage.val_set is not None and position.step % train.eval_every == 0:
        _validation(run)
    if position.step % train.save_every == 0 and position.step < run.total_steps:
        run.last_good = _save(run)


def _fit_to_budget(run: _Run, fitted: int) -> None:
    """Say what the measured pace means for the plan; when it would overrun, train `fitted` steps instead
    of the plan's, over a redrawn schedule, and remember that for --resume."""
    s, n, pace = run.stage.settings, run.stage.number, run.budget.seconds_per_step
    budget = f"stage{n}.time_budget_s={s.time_budget_s:.4g}"
    if fitted >= run.total_steps:
        run.accelerator.print(f"\nstage {n}: {pace:.2f} s/step here: the {run.total_steps} planned steps take "
                              f"~{run.total_steps * pace / 60:.1f} min, within {budget}")
        return
    run.accelerator.print(f"\nstage {n}: {pace:.2f} s/step here; {run.budget.total_steps} steps would overrun "
                          f"{budget}: training {fitted} steps (~{fitted * pace / 60:.1f} min)")
    redraw_schedule(run.scheduler, s.warmup_steps, fitted)
    if run.accelerator.is_main_process:
        save_plan(run.out, fitted, run.budget.seconds_per_step, s.time_budget_s)
    run.bar.total = run.total_steps = fitted


def _log_step(run: _Run, output: ObjectiveOutput, grad_norm: torch.Tensor | None) -> None:
    """One metrics line: the last micro-batch's loss, its parts and metrics (averaged over processes),
    the learning rate, throughput since the last line, the gradient norm and the stage's own fields."""
    elapsed = time.perf_counter() - run.tick
    scalars = output.scalars()
    # mean over processes, so the log shows the global batch's loss
    means = run.accelerator.reduce(torch.stack([v.detach().float() for v in scalars.values()]), "mean")
    record = {"stage": f"stage{run.stage.number}", "step": run.position.step, "epoch": run.position.epoch,
              **{k: round(float(v), 5) for k, v in zip(scalars, means, strict=True)},
              "lr": run.scheduler.get_last_lr()[-1], "samples_per_s": round(run.samples / elapsed, 2)}
    if grad_norm is not None:
        record["grad_norm"] = round(float(grad_norm), 6)
    record.update(run.stage.log_fields())  # stage 2: pad_fraction of this process's batches
    run.log.write(record)
    run.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
    run.samples, run.tick = 0, time.perf_counter()


def _validation(run: _Run) -> dict:
    """Validate, log the metrics and keep the best model so far in RUN/best (`train.keep_best`)."""
    accelerator, step, best = run.accelerator, run.position.step, run.best
    metrics = validate(run.wrapped, run.stage, accelerator)
    run.log.write({"stage": f"stage{run.stage.number}", "step": step, **metrics})
    if best is not None and accelerator.is_main_process and best.update(run.stage.model, metrics, step):
        accelerator.print(f"step {step}: best {best.metric} so far ({metrics[best.metric]}), saved to {best.folder}")
    accelerator.wait_for_everyone()
    run.stage.model.train()
    return metrics


@torch.no_grad()
def validate(wrapped: nn.Module, stage: Stage, accelerator: Accelerator, max_batches: int = 20) -> dict:
    """`val_loss` on up to `max_batches` batches, each of the objective's metrics as `val_<name>`
    averaged over samples (stage 1: `val_r1`, retrieval R@1 within batches), and the stage's
    `extra_validation` (stage 2: scores of greedy generations)."""
    stage.model.eval()
    loader = DataLoader(stage.val_set, batch_size=stage.settings.batch_size, collate_fn=stage.collate,
                        shuffle=False)
    losses, sums, total = [], {}, 0
    for i, batch in enumerate(loader):
        if i >= max_batches or not batch:
            break
        output = wrapped(**_inputs(batch, stage.inputs, accelerator.device))
        losses.append(output.loss.item())
        for name, value in output.metrics.items():
            sums[name] = sums.get(name, 0.0) + value.item() * len(batch["features"])
        total += len(batch["features"])
    result = {"val_loss": round(sum(losses) / max(1, len(losses)), 5)}
    result.update({f"val_{name}": round(value / max(1, total), 4) for name, value in sums.items()})
    return result | stage.extra_validation()


def _inputs(batch: dict, names: tuple[str, ...], device: torch.device) -> dict:
    """The objective's arguments: the batch's entries named in `names` (those present), tensors moved
    to `device`, lists of strings as they are."""
    return {name: batch[name].to(device, non_blocking=True) if isinstance(batch[name], torch.Tensor)
            else batch[name] for name in names if name in batch}


def _finish(run: _Run) -> None:
    """Validate at the last step (unless just done), log the stage's report, save the last checkpoint
    and the model (RUN/model)."""
    accelerator, step = run.accelerator, run.position.step
    if run.stage.val_set is not None and step % run.train.eval_every:
        _validation(run)
    report = run.stage.after_training(accelerator)  # every process takes part (counts are summed)
    if report:
        run.log.write({"stage": f"stage{run.stage.number}", "step": step, **report})
    _save(run)
    if accelerator.is_main_process:
        run.stage.model.save_pretrained(run.out / "model")
    run.log.close()
    accelerator.wait_for_everyone()


def _save(run: _Run) -> Path | None:
    """A checkpoint of the run at its position (written by the main process; its path there)."""
    path = None
    if run.stream is not None:  # every process's readers: each process holds its own positions
        run.position.stream = run.stream.merged(gather_object([run.stream])).to_json()
    if run.accelerator.is_main_process:
        path = save_checkpoint(run.out / "checkpoints", run.stage.model, run.optimizer, run.scheduler,
                               Position(**vars(run.position)))
    run.accelerator.wait_for_everyone()
    return path


def _prepare_run_folder(out: Path, stage: int, resume: bool, accelerator) -> None:
    if accelerator.is_main_process:
        if (out / "model").exists() and not resume:
            raise QVLMError(f"{out} already holds a trained model; choose another --out or pass --resume")
        if (out / "checkpoints").exists() and not resume:
            raise QVLMError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it")
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"stage": stage}) + "\n")
    accelerator.wait_for_everyone()


"""`qvlm bench`: training and inference throughput, measured side by side with the reference recipe.

Random weights at the preset's real sizes (no download), synthetic images and captions of realistic
length. Each figure is samples (or images, tokens) per second over a few timed steps after warm-up.

A `Recipe` says how a training step runs. `fast` is how qvlm trains: patch features from the feature
cache (the encoder ran once, before training; its cost is the separate `extract` figure), large batches,
each stage in its `stageN.mixed_precision` as `qvlm train` resolves it (`auto`: bf16 on GPUs, and on CPUs
where the probe of qvlm/precision.py measured it faster), with the frozen LM stored in bf16 and, in stage 2
on CPU, the plain-matmul attention kernel, peft's LoRA input casts left to autocast, the vocabulary
projection only where targets are and the softmax only on labelled rows (`Stage2Objective`, what `qvlm
train` steps on), dropout masks from qvlm.models.dropout, fused AdamW.
Counted FLOP/s are also given as a fraction of this machine's own measured matmul peak in the same dtype.
The baseline is how the article's code trains: the fp32 vision encoder per sample inside the loop (its
`Dataset.__getitem__`), batch 8, bf16 autocast in stage 2 only, logits everywhere, PyTorch's dropout,
default kernels, no cache. Both use the same model sizes, prompts and answers, so `speedup` is a like-for-like ratio.
`--ablate` turns each fast path off alone, to show what each one is worth. `--compile` adds
`torch.compile` to the fast recipe (as `train.compile=true` does), its compile time reported apart.
"""

from __future__ import annotations

import random
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from qvlm import precision
from qvlm.config import ConfigError, QVLMConfig, get_preset
from qvlm.models.dropout import use_fast_dropout
from qvlm.models.objectives import Stage1Objective, Stage2Objective
from qvlm.models.processing import DEFAULT_CAPTION_PROMPT, build_stage2_batch
from qvlm.models.vlm import QVLM
from qvlm.train.optim import build_optimizer, stage1_param_groups, stage2_param_groups

WORDS = ("a dog runs on the beach near the water while a man in a red shirt throws a ball "
         "two children play football in a green park under a cloudy sky").split()
PAIRS, STAGE1_EPOCHS, STAGE2_EPOCHS = 50_000, 10, 5  # the reference recipe
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, for model FLOPs utilisation; first match wins.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12}


@dataclass(frozen=True)
class Recipe:
    """How a training step runs. Fields are the fast paths; `batch=None` is the device's fast default."""

    feature_cache: bool = True  # else the encoder runs per sample inside the loop
    batch: int | None = None
    bf16: bool = True  # autocast over the step (the baseline: stage 2 only, as the article)
    frozen_bf16: bool = True  # frozen LM weights stored in bf16, not re-cast at every call
    math_attention: bool = True  # CPU + bf16: matmul + softmax attention (see qvlm/precision.py)
    labelled_logits: bool = True  # vocabulary projection only where targets, softmax only on labelled rows
    fast_dropout: bool = True  # dropout masks from qvlm.models.dropout (PyTorch's CPU RNG costs 5x more)
    lora_casts_off: bool = True  # under autocast: peft's LoRA input casts to fp32 left out
    fused_adamw: bool = True
    compile: bool = False  # torch.compile the forward (opt-in, as `train.compile`)


# The article autocasts its LM to bf16 (stage 2) and trains the Q-Former in fp32 (stage 1).
BASELINE = {2: Recipe(feature_cache=False, batch=8, frozen_bf16=False, math_attention=False,
                      labelled_logits=False, fast_dropout=False, lora_casts_off=False, fused_adamw=False)}
BASELINE[1] = replace(BASELINE[2], bf16=False)
ABLATIONS = {"feature_cache": "encoder per sample in the loop", "batch": "batch 8",
             "bf16": "fp32 (no bf16)", "frozen_bf16": "frozen LM kept fp32",
             "math_attention": "default attention kernel", "labelled_logits": "logits at every position",
             "fast_dropout": "PyTorch's dropout", "lora_casts_off": "peft's LoRA input casts",
             "fused_adamw": "unfused AdamW", "compile": "not compiled"}


def synthetic_batch(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """n random RGB images and captions of 8-14 words (Conceptual Captions' typical length)."""
    rng = random.Random(seed)
    arrays = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) for _ in range(n)]
    return [Image.fromarray(a) for a in arrays], captions


def _timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of `step()`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _counted_flops(step) -> int:
    """FLOPs of one call of `step()` (forward + backward), counted by PyTorch per operator."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _encoder_precision(vision, choice: str):
    saved, vision.precision = vision.precision, choice
    try:
        yield
    finally:
        vision.precision = saved


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class _AllLogitsLoss(torch.nn.Module):
    """The stage-2 model's forward with logits at every position, as `transformers` computes its loss."""

    def __init__(self, model: QVLM):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, **tokens: torch.Tensor):
        return self.model(features, **tokens, all_logits=True)


class Bench:
    def __init__(self, config: QVLMConfig, device: torch.device, steps: int, warmup: int,
                 fast_batches: tuple[int, int], compile: bool = False):
        self.config, self.device, self.steps, self.warmup = config, device, steps, warmup
        self.compile = compile
        self.model = QVLM.build(config, stage=2, device="cpu").to(device)
        self.size = self.model.vision.image_size
        self.precision = {stage: _stage_precision(config, stage, device) for stage in (1, 2)}
        self.fast_batches = fast_batches
        self.peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items()
                                if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
        self._matmul_peaks: dict[torch.dtype, float] = {}

    def fast(self, stage: int) -> Recipe:
        """What `qvlm train` does on this device in the stage's `mixed_precision` (qvlm/precision.py)."""
        bf16 = self.precision[stage] == "bf16"
        return Recipe(bf16=bf16, frozen_bf16=bf16, math_attention=bf16 and stage == 2, lora_casts_off=bf16,
                      compile=self.compile)

    def matmul_peak(self, dtype: torch.dtype) -> float:
        """This machine's measured matmul FLOP/s in `dtype` (one large square product), measured once."""
        if dtype not in self._matmul_peaks:
            n = 8192 if self.device.type == "cuda" else 1536  # large enough to saturate; seconds, not minutes
            a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
            seconds = _timed(lambda: a @ b, max(1, self.warmup), max(3, self.steps), self.device)
            self._matmul_peaks[dtype] = 2 * n**3 / seconds
        return self._matmul_peaks[dtype]

    def extract(self, batch: int) -> dict:
        """Feature extraction, images/s: in `vision.precision` (what building the cache costs) and, where
        that is not fp32, in fp32 too (what the baseline's encoder runs in)."""
        vision = self.model.vision
        images, _ = synthetic_batch(batch, self.size)
        pixels = vision.preprocess(images).to(self.device)
        result = {"batch": batch, "dtype": str(vision.compute_dtype or torch.float32)}
        runs = {"images_per_s": vision.precision} | ({"fp32_images_per_s": "fp32"} if vision.compute_dtype else {})
        for key, choice in runs.items():
            with torch.inference_mode(), _encoder_precision(vision, choice):
                result[key] = batch / _timed(lambda: vision(pixels), self.warmup, self.steps, self.device)
        return result

    def _features(self, images: list[Image.Image], per_sample: bool) -> torch.Tensor:
        if per_sample:  # the article's Dataset.__getitem__: one image at a time through the fp32 encoder
            with _encoder_precision(self.model.vision, "fp32"):
                return torch.cat([self.model.encode_images([img]) for img in images])
        return self.model.encode_images(images)

    def _measure(self, stage: int, recipe: Recipe, module: torch.nn.Module, loss_of, params: list[dict],
                 batch: int, images) -> dict:
        """Time `loss_of(module, features)` + backward + AdamW under `recipe`.

        FLOPs are counted on an eager call; the first timed call alone is `first_step_s`, which holds
        the compile time when `recipe.compile`.
        """
        stage_cfg = self.config.stage1 if stage == 1 else self.config.stage2
        optimizer = build_optimizer(params, stage_cfg, fused=recipe.fused_adamw)
        use_fast_dropout(self.model, recipe.fast_dropout)
        cached = self._features(images, per_sample=False) if recipe.feature_cache else None
        module.train()
        if recipe.compile:
            torch._dynamo.reset()  # a fresh compile per recipe: earlier ones' guards must not pile up
        compiled = torch.compile(module) if recipe.compile else module

        def step(run=compiled):
            features = cached if recipe.feature_cache else self._features(images, per_sample=True)
            kernels = (precision.attention_kernels(self.device, "bf16" if recipe.bf16 else "fp32", stage)
                       if recipe.math_attention else nullcontext())
            casts = precision.lora_input_casts_off(self.model, autocast=recipe.bf16 and recipe.lora_casts_off)
            with kernels, casts, _autocast(self.device, recipe.bf16):
                loss = loss_of(run, features)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        flops = _counted_flops(lambda: step(module))
        first_step = _timed(step, 0, 1, self.device)
        seconds = _timed(step, max(0, self.warmup - 1), self.steps, self.device)
        peak = self.matmul_peak(torch.bfloat16 if recipe.bf16 else torch.float32)
        result = {"batch": batch, "samples_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
                  "peak_fraction": flops / seconds / peak, "first_step_s": first_step, "recipe": asdict(recipe)}
        if self.peak_flops:
            result["mfu"] = flops / seconds / self.peak_flops
        return result

    def stage1(self, recipe: Recipe) -> dict:
        batch = recipe.batch or self.fast_batches[0]
        objective = Stage1Objective(self.model, self.config)
        images, captions = synthetic_batch(batch, self.size, seed=1)
        keys = [str(i) for i in range(batch)]
        return self._measure(1, recipe, objective, lambda run, f: run(f, captions, keys).loss,
                             stage1_param_groups(self.model, self.config), batch, images)

    def stage2(self, recipe: Recipe) -> dict:
        batch = recipe.batch or self.fast_batches[1]
        images, captions = synthetic_batch(batch, self.size, seed=2)
        tokens = build_stage2_batch(self.model.tokenizer, [DEFAULT_CAPTION_PROMPT] * batch, captions,
                                    self.config.qformer.num_queries, self.config.lm.image_position,
                                    self.config.lm.system_prompt)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        frozen = torch.bfloat16 if recipe.bf16 and recipe.frozen_bf16 else torch.float32
        precision.store_frozen_in(self.model.lm, frozen)
        if recipe.labelled_logits:  # what `qvlm train` steps on
            module = Stage2Objective(self.model, learn_description=self.config.lm.learn_description)
        else:  # the article's: transformers' loss over logits at every position
            module = _AllLogitsLoss(self.model)
        result = self._measure(2, recipe, module, lambda run, f: run(f, **tokens).loss,
                               stage2_param_groups(self.model, self.config), batch, images)
        precision.store_frozen_in(self.model.lm, torch.float32)  # next recipe; bf16-rounded random weights time the same
        return {**result, "seq_len": tokens["input_ids"].shape[1]}

    def ablation(self, stage: int) -> dict:
        """The fast recipe with each applicable fast path turned off alone."""
        fast, measure = self.fast(stage), (self.stage1 if stage == 1 else self.stage2)
        rows = {}
        for name, label in ABLATIONS.items():
            if stage == 1 and name in ("frozen_bf16", "labelled_logits", "lora_casts_off"):
                continue  # stage 1 has no LM
            if name == "batch":
                variant = replace(fast, batch=8)
            elif getattr(fast, name):
                variant = replace(fast, **{name: False})
            else:
                continue  # already off on this hardware
            rows[label] = measure(variant)
        return rows

    def generate(self, batch: int, new_tokens: int = 16) -> dict:
        """Greedy decoding of exactly `new_tokens` tokens (EOS disabled): latency and tokens/s. Timed from
        encoded images: the Q-Former, the adapter and the LM's decoding, as `model.generate` runs them."""
        images, _ = synthetic_batch(batch, self.size, seed=3)
        features = self.model.encode_images(images)
        self.model.eval()
        inputs = self.model.processor(text=[DEFAULT_CAPTION_PROMPT] * batch)
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "temperature": 0.0,
                  "num_beams": 1, "eos_token_id": None}
        with torch.inference_mode():  # as `qvlm caption` / `ask` / `serve` run it (the LM in `lm.dtype`)
            seconds = _timed(lambda: self.model.generate(**inputs, image_features=features, **kwargs), 1,
                             max(1, self.steps // 2), self.device)
        return {"batch": batch, "new_tokens": new_tokens, "latency_s": seconds,
                "tokens_per_s": batch * new_tokens / seconds}


def bench_config(preset: str, overrides: list[str] = (), tokenizer: str = "bundle:smollm2-135m-instruct"
                 ) -> QVLMConfig:
    """The preset at its real sizes with random weights (no download), then `overrides`.

    Only the LM's tokenizer is real (the bundle's SmolLM2, SmolLM's vocabulary, or a folder holding its
    files): it keeps stage-2 sequence lengths real, which set its speed. `tiny` is used as it is.
    """
    from qvlm.cli.info import with_known_architectures

    config = get_preset(preset)
    if preset != "tiny":
        config = with_known_architectures(config).override([f"lm.tokenizer={tokenizer}"])
    return config.override(list(overrides))


def _stage_precision(config: QVLMConfig, stage: int, device: torch.device) -> str:
    setting = f"stage{stage}.mixed_precision"
    choice = precision.resolve(getattr(config, f"stage{stage}").mixed_precision, device, setting)
    if choice == "fp16":
        raise ConfigError(f"qvlm bench times fp32 and bf16 recipes; set {setting} to fp32, bf16 or auto")
    return choice


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def projected_hours(extract_ips: float, stage1_sps: float, stage2_sps: float) -> float:
    """Feature extraction once + 10 stage-1 epochs + 5 stage-2 epochs over 50,000 pairs, in hours."""
    seconds = PAIRS / extract_ips + STAGE1_EPOCHS * PAIRS / stage1_sps + STAGE2_EPOCHS * PAIRS / stage2_sps
    return seconds / 3600


def run_bench(config: QVLMConfig, device: torch.device, compare_baseline: bool, steps: int = 3,
              warmup: int = 1, stage1_batch: int | None = None, stage2_batch: int | None = None,
              ablate: bool = False, compile: bool = False) -> dict:
    """All measurements; fast batch sizes default to 64 / 16 on CPU and 256 / 64 on CUDA."""
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    bench = Bench(config, device, steps, warmup,
                  fast_batches=(stage1_batch or (256 if gpu else 64), stage2_batch or (64 if gpu else 16)),
                  compile=compile)
    result = {
        "preset": config.preset, "device": torch.cuda.get_device_name() if gpu else precision.cpu_model_name(),
        "threads": torch.get_num_threads(), "image_size": bench.size, "num_queries": config.qformer.num_queries,
        "precision": {f"stage{n}": precision.explain(getattr(config, f"stage{n}").mixed_precision, device,
                                                     f"stage{n}.mixed_precision") for n in (1, 2)},
        "extract": bench.extract(128 if gpu else 32),
        "stage1": {"fast": bench.stage1(bench.fast(1))},
        "stage2": {"fast": bench.stage2(bench.fast(2))},
        "generate": {"single": bench.generate(1), "batched": bench.generate(16)},
    }
    fast = (result["extract"]["images_per_s"], result["stage1"]["fast"]["samples_per_s"],
            result["stage2"]["fast"]["samples_per_s"])
    result["projected_hours"] = {"fast": projected_hours(*fast)}
    if compare_baseline:
        for stage, measure in ((1, bench.stage1), (2, bench.stage2)):
            r = result[f"stage{stage}"]
            r["baseline"] = measure(BASELINE[stage])
            r["speedup"] = r["fast"]["samples_per_s"] / r["baseline"]["samples_per_s"]
        # the baseline encodes inside its loop, so its projection has no separate extraction pass
        s1, s2 = result["stage1"]["baseline"]["samples_per_s"], result["stage2"]["baseline"]["samples_per_s"]
        result["projected_hours"]["baseline"] = (STAGE1_EPOCHS * PAIRS / s1 + STAGE2_EPOCHS * PAIRS / s2) / 3600
    if ablate:
        for stage in (1, 2):
            result[f"stage{stage}"]["ablation"] = bench.ablation(stage)
    result["matmul_peak_tflops"] = {str(dtype).removeprefix("torch."): flops / 1e12
                                    for dtype, flops in bench._matmul_peaks.items()}
    result["peak_memory_gib"] = peak_memory_gib(device)
    return result


def format_table(result: dict) -> str:
    extract = result["extract"]
    rows = [(f"extract (images/s, {extract['dtype'].removeprefix('torch.')})", extract["images_per_s"], None, None)]
    if "fp32_images_per_s" in extract:
        rows.append(("extract in fp32 (images/s)", extract["fp32_images_per_s"], None, None))
    for stage in ("stage1", "stage2"):
        r = result[stage]
        base = r.get("baseline", {}).get("samples_per_s")
        rows.append((f"{stage} train (samples/s, batch {r['fast']['batch']})", r["fast"]["samples_per_s"],
                     base, r.get("speedup")))
    g = result["generate"]
    rows.append(("generate 1 x 16 tokens (s)", g["single"]["latency_s"], None, None))
    rows.append(("generate 16 x 16 (tokens/s)", g["batched"]["tokens_per_s"], None, None))
    lines = [f"qvlm bench: preset {result['preset']}, {result['device']}, {result['threads']} threads, "
             f"{result['image_size']} px, {result['num_queries']} queries",
             *(f"stage {n} {line}" for n, line in enumerate(result["precision"].values(), 1)),
             f"{'':<42}{'qvlm':>12}{'baseline':>12}{'speedup':>10}"]
    for name, ours, base, speedup in rows:
        lines.append(f"{name:<42}{ours:>12.2f}{'' if base is None else f'{base:12.2f}':>12}"
                     f"{'' if speedup is None else f'{speedup:9.1f}x':>10}")
    hours = result["projected_hours"]
    lines.append(f"projected 50k pairs x (10 + 5) epochs: {hours['fast']:.2f} h"
                 + (f" (baseline {hours['baseline']:.2f} h)" if "baseline" in hours else ""))
    for stage in ("stage1", "stage2"):
        fast = result[stage]["fast"]
        mfu = f", MFU {fast['mfu']:.1%}" if "mfu" in fast else ""
        compiled = f", first step {fast['first_step_s']:.0f} s (compiling)" if fast["recipe"]["compile"] else ""
        dtype = "bfloat16" if fast["recipe"]["bf16"] else "float32"
        lines.append(f"{stage} fast: {fast['tflops']:.2f} TFLOP/s counted, {fast['peak_fraction']:.1%} of the "
                     f"measured {dtype} matmul peak ({result['matmul_peak_tflops'][dtype]:.2f} TFLOP/s)"
                     f"{mfu}{compiled}")
        if "ablation" in result[stage]:
            lines.append(f"  {stage} fast paths, each turned off alone (samples/s; fast is x times that):")
            for label, r in result[stage]["ablation"].items():
                lines.append(f"    {label:<38}{r['samples_per_s']:>10.2f}"
                             f"{fast['samples_per_s'] / r['samples_per_s']:>9.2f}x")
    lines.append(f"peak memory: {result['peak_memory_gib']:.2f} GiB")
    return "\n".join(lines)

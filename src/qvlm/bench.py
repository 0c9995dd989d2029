"""`qvlm bench`: training and inference throughput, measured side by side with the reference recipe.

Random weights at the preset's real sizes (no download), synthetic images and captions of realistic
length. Each figure is samples (or images, tokens) per second over a few timed steps after warm-up.

Fast mode is how qvlm trains: patch features come from the feature cache (the encoder ran once, before
training; its cost is the separate `extract` figure), large batches, fused AdamW on CUDA, bf16 autocast
only where the hardware has bf16 units. Baseline mode is how the article's code trains: the vision
encoder runs per sample inside the loop (its `Dataset.__getitem__`), batch 8, bf16 autocast on the LM,
no cache. Both use the same model sizes, prompts and answers, so `speedup` is a like-for-like ratio.
"""

from __future__ import annotations

import platform
import random
import resource
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

from qvlm.config import QVLMConfig
from qvlm.data.prompts import DEFAULT_CAPTION_PROMPT
from qvlm.data.sequences import build_stage2_batch
from qvlm.models.vlm import QVLM
from qvlm.train.optim import make_optimizer, stage1_param_groups, stage2_param_groups
from qvlm.train.trainer import Stage1Objective

WORDS = ("a dog runs on the beach near the water while a man in a red shirt throws a ball "
         "two children play football in a green park under a cloudy sky").split()
PAIRS, STAGE1_EPOCHS, STAGE2_EPOCHS = 50_000, 10, 5  # the reference recipe


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class Bench:
    def __init__(self, config: QVLMConfig, device: torch.device, steps: int, warmup: int):
        self.config, self.device, self.steps, self.warmup = config, device, steps, warmup
        self.model = QVLM.build(config, stage=2, device="cpu").to(device)
        self.size = self.model.vision.image_size
        self.bf16_fast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def extract(self, batch: int) -> dict:
        """Feature extraction (what building the cache costs), images/s."""
        images, _ = synthetic_batch(batch, self.size)
        pixels = self.model.vision.preprocess(images).to(self.device)
        with torch.inference_mode(), _autocast(self.device, self.bf16_fast):
            seconds = _timed(lambda: self.model.vision(pixels), self.warmup, self.steps, self.device)
        return {"batch": batch, "images_per_s": batch / seconds}

    def _features(self, images: list[Image.Image], per_sample: bool) -> torch.Tensor:
        if per_sample:  # the article's Dataset.__getitem__: one image through the encoder at a time
            return torch.cat([self.model.encode_images([img]) for img in images])
        return self.model.encode_images(images)

    def stage1(self, batch: int, baseline: bool) -> dict:
        objective = Stage1Objective(self.model, self.config)
        optimizer = make_optimizer(stage1_param_groups(self.model, self.config))
        images, captions = synthetic_batch(batch, self.size, seed=1)
        keys = [str(i) for i in range(batch)]
        cached = None if baseline else self._features(images, per_sample=False)
        self.model.train()

        def step():
            features = self._features(images, per_sample=True) if baseline else cached
            with _autocast(self.device, self.bf16_fast and not baseline):
                loss = objective(features, captions, keys)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return {"batch": batch, "samples_per_s": batch / _timed(step, self.warmup, self.steps, self.device)}

    def stage2(self, batch: int, baseline: bool) -> dict:
        optimizer = make_optimizer(stage2_param_groups(self.model, self.config))
        images, captions = synthetic_batch(batch, self.size, seed=2)
        tokens = build_stage2_batch(self.model.tokenizer, [DEFAULT_CAPTION_PROMPT] * batch, captions,
                                    self.config.qformer.num_queries, self.config.lm.image_position,
                                    self.config.lm.system_prompt)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        cached = None if baseline else self._features(images, per_sample=False)
        bf16 = baseline or self.bf16_fast  # the article autocasts its LM to bf16 everywhere
        self.model.train()

        def step():
            features = self._features(images, per_sample=True) if baseline else cached
            with _autocast(self.device, bf16):
                loss = self.model(features, **tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = _timed(step, self.warmup, self.steps, self.device)
        return {"batch": batch, "seq_len": tokens["input_ids"].shape[1], "bf16": bf16,
                "samples_per_s": batch / seconds}

    def generate(self, batch: int, new_tokens: int = 16) -> dict:
        """Greedy decoding of exactly `new_tokens` tokens (EOS disabled): latency and tokens/s."""
        images, _ = synthetic_batch(batch, self.size, seed=3)
        features = self.model.encode_images(images)
        self.model.eval()
        inputs = self.model._generation_inputs(features, [DEFAULT_CAPTION_PROMPT] * batch)
        kwargs = {**self.model._generation_kwargs(max_new_tokens=new_tokens), "eos_token_id": None,
                  "min_new_tokens": new_tokens}
        with torch.inference_mode(), _autocast(self.device, self.bf16_fast):
            seconds = _timed(lambda: self.model.lm.generate(**inputs, **kwargs), 1, max(1, self.steps // 2),
                             self.device)
        return {"batch": batch, "new_tokens": new_tokens, "latency_s": seconds,
                "tokens_per_s": batch * new_tokens / seconds}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def projected_hours(extract_ips: float, stage1_sps: float, stage2_sps: float) -> float:
    """Feature extraction once + 10 stage-1 epochs + 5 stage-2 epochs over 50,000 pairs, in hours."""
    seconds = PAIRS / extract_ips + STAGE1_EPOCHS * PAIRS / stage1_sps + STAGE2_EPOCHS * PAIRS / stage2_sps
    return seconds / 3600


def run_bench(config: QVLMConfig, device: torch.device, compare_baseline: bool, steps: int = 3,
              warmup: int = 1, stage1_batch: int | None = None, stage2_batch: int | None = None) -> dict:
    """All measurements; fast batch sizes default to 64 / 16 on CPU and 256 / 64 on CUDA."""
    torch.manual_seed(0)
    bench = Bench(config, device, steps, warmup)
    gpu = device.type == "cuda"
    result = {
        "preset": config.preset, "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "image_size": bench.size,
        "num_queries": config.qformer.num_queries,
        "extract": bench.extract(128 if gpu else 32),
        "stage1": {"fast": bench.stage1(stage1_batch or (256 if gpu else 64), baseline=False)},
        "stage2": {"fast": bench.stage2(stage2_batch or (64 if gpu else 16), baseline=False)},
        "generate": {"single": bench.generate(1), "batched": bench.generate(16)},
    }
    fast = (result["extract"]["images_per_s"], result["stage1"]["fast"]["samples_per_s"],
            result["stage2"]["fast"]["samples_per_s"])
    result["projected_hours"] = {"fast": projected_hours(*fast)}
    if compare_baseline:
        for stage, measure in (("stage1", bench.stage1), ("stage2", bench.stage2)):
            result[stage]["baseline"] = measure(8, baseline=True)
            result[stage]["speedup"] = (result[stage]["fast"]["samples_per_s"]
                                        / result[stage]["baseline"]["samples_per_s"])
        # the baseline encodes inside its loop, so its projection has no separate extraction pass
        s1, s2 = result["stage1"]["baseline"]["samples_per_s"], result["stage2"]["baseline"]["samples_per_s"]
        result["projected_hours"]["baseline"] = (STAGE1_EPOCHS * PAIRS / s1 + STAGE2_EPOCHS * PAIRS / s2) / 3600
    result["peak_memory_gib"] = peak_memory_gib(device)
    return result


def format_table(result: dict) -> str:
    rows = [("extract (images/s)", result["extract"]["images_per_s"], None, None)]
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
             f"{'':<42}{'qvlm':>12}{'baseline':>12}{'speedup':>10}"]
    for name, ours, base, speedup in rows:
        lines.append(f"{name:<42}{ours:>12.2f}{'' if base is None else f'{base:12.2f}':>12}"
                     f"{'' if speedup is None else f'{speedup:9.1f}x':>10}")
    hours = result["projected_hours"]
    lines.append(f"projected 50k pairs x (10 + 5) epochs: {hours['fast']:.2f} h"
                 + (f" (baseline {hours['baseline']:.2f} h)" if "baseline" in hours else ""))
    lines.append(f"peak memory: {result['peak_memory_gib']:.2f} GiB")
    return "\n".join(lines)

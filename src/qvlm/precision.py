"""Mixed precision: where bf16 pays off, and the two adjustments that make it pay off on CPUs.

On a GPU, `auto` means bf16 wherever the card supports it. On a CPU it is measured: bf16 ran 7x faster
than fp32 in matmuls on an AMX Xeon, 2x on an AMD EPYC with avx512_bf16 and no AMX, and ~3x slower
where the CPU has no bf16 instructions and oneDNN emulates them. So `auto` runs a short probe once per
machine (matmuls at the LM's shapes and one LM-sized block forward + backward, fp32 vs bf16, well under
a second), caches the timings under the qvlm cache home keyed by the CPU's model name and the torch
version, and picks bf16 only where it is clearly faster (`MARGIN`). Trainable weights keep fp32 master
copies either way. Three things would eat the gain (docs/BENCHMARKS.md, "fast paths"):
- autocast re-casts frozen fp32 weights at every call; frozen weights need no fp32 master copy, so the
  frozen LM is stored in bf16 instead (the trainable LoRA, adapter and Q-Former stay fp32);
- PyTorch's fused CPU attention kernel is ~10x slower backwards in bf16 than in fp32 at the LM's short
  sequence lengths, while the plain matmul + softmax ("math") kernel runs on the bf16 matrix units;
- peft casts each LoRA layer's input to its fp32 weights' dtype and autocast casts it straight back to
  bf16 for the matmul: two copies of every q/k/v/o input, a tenth of a bf16 stage-2 step, so training
  steps under autocast turn peft's cast off (`lora_input_casts_off`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from peft.helpers import disable_input_dtype_casting
from torch.nn.attention import SDPBackend, sdpa_kernel

from qvlm.config import PRECISIONS, ConfigError
from qvlm.utils import cache_home

CHOICES = PRECISIONS  # one list, also named by the config errors
MARGIN = 1.15  # bf16 must be this many times faster than fp32: closer calls are noise, and fp32 is exact
PROBE_FILE = "precision-probe.json"
# The probe's shapes: SmolLM2-135M's layer (width 576, MLP 1536, 9 query / 3 key-value heads of 64),
# the LM of the offline and paper presets, over 2 sequences of 64 tokens: small enough for the probe to
# take well under a second on 2 cores, large enough for the matrix units to dominate as in training.
WIDTH, MLP, HEADS, KV_HEADS, BATCH, SEQ = 576, 1536, 9, 3, 2, 64


@dataclass(frozen=True)
class CpuProbe:
    """What `auto` chose on this CPU and the timings it chose by."""

    choice: str  # "bf16" or "fp32"
    ratio: float  # fp32 seconds / bf16 seconds, geometric mean over the workloads (> 1: bf16 faster)
    cpu: str
    torch: str
    probed: str  # ISO date
    seconds: dict[str, list[float]]  # workload -> [fp32 s, bf16 s]; empty without native bf16
    native_bf16: bool
    load: float = 0.0  # 1-minute load average per core while probing: near or above 1, timings were shared


_probes: dict[tuple[str, str], CpuProbe] = {}  # (cache file, key) -> probe: one read per process


def cpu_model_name() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 in hardware (AVX-512, AMX, Arm bf16); elsewhere it emulates, ~3x slower."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private, hence the guard
    return bool(check and check())


def _block_step(weights: dict[str, torch.Tensor], x: torch.Tensor, bf16: bool) -> None:
    """One pre-norm LM block (attention + SwiGLU) forward and backward to its input: x [B, T, WIDTH]."""
    with attention_kernels(x.device, "bf16" if bf16 else "fp32", stage=2), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = F.rms_norm(x, (WIDTH,))
        q = (h @ weights["q"]).view(BATCH, SEQ, HEADS, -1).transpose(1, 2)  # [B, H, T, 64]
        kv = (h @ weights["kv"]).view(BATCH, SEQ, 2 * KV_HEADS, -1).transpose(1, 2)  # [B, 2 x 3, T, 64]
        k, v = kv.repeat_interleave(HEADS // KV_HEADS, dim=1).chunk(2, dim=1)  # grouped-query: [B, H, T, 64] each
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.transpose(1, 2).reshape(BATCH, SEQ, WIDTH) @ weights["o"]
        h = F.rms_norm(x, (WIDTH,))
        x = x + (F.silu(h @ weights["gate"]) * (h @ weights["up"])) @ weights["down"]
    x.float().sum().backward()


def _workloads() -> dict[str, tuple]:
    """workload name -> (fp32 step, bf16 step): the frozen weights each stored in its own dtype, as in training."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
    tokens = BATCH * SEQ * 2
    mats = {f"matmul {tokens}x{k}x{n}": (rand(tokens, k), rand(k, n))
            for k, n in ((WIDTH, MLP), (MLP, WIDTH), (WIDTH, WIDTH))}
    weights = {"q": rand(WIDTH, WIDTH), "kv": rand(WIDTH, 2 * KV_HEADS * 64), "o": rand(WIDTH, WIDTH),
               "gate": rand(WIDTH, MLP), "up": rand(WIDTH, MLP), "down": rand(MLP, WIDTH)}
    x = rand(BATCH, SEQ, WIDTH) * 50
    runs = {}
    for name, (a, b) in mats.items():
        a16, b16 = a.bfloat16(), b.bfloat16()
        runs[name] = (lambda a=a, b=b: a @ b, lambda a=a16, b=b16: a @ b)
    w16 = {k: w.bfloat16() for k, w in weights.items()}
    runs["LM block fwd+bwd"] = tuple(
        (lambda w=w, bf16=bf16: _block_step(w, x.clone().requires_grad_(), bf16))
        for w, bf16 in ((weights, False), (w16, True)))
    return runs


def _time_workloads(repeats: int = 3) -> dict[str, list[float]]:
    """Best-of-`repeats` wall seconds per call, fp32 and bf16 interleaved so both see the same machine load."""
    seconds = {}
    for name, steps in _workloads().items():
        for step in steps:
            step()  # warm-up: oneDNN builds its kernels on first use
        best = [math.inf, math.inf]
        for _ in range(repeats):
            for i, step in enumerate(steps):
                start = time.perf_counter()
                step()
                best[i] = min(best[i], time.perf_counter() - start)
        seconds[name] = best
    return seconds


def probe_cpu() -> CpuProbe:
    """Time the workloads now and decide (no cache): bf16 only where native and >= MARGIN x faster."""
    native = cpu_has_native_bf16()
    seconds = _time_workloads() if native else {}
    ratio = math.exp(sum(math.log(f32 / b16) for f32, b16 in seconds.values()) / len(seconds)) if seconds else 0.0
    return CpuProbe(choice="bf16" if native and ratio >= MARGIN else "fp32", ratio=ratio, cpu=cpu_model_name(),
                    torch=torch.__version__, probed=datetime.date.today().isoformat(), seconds=seconds,
                    native_bf16=native, load=os.getloadavg()[0] / (os.cpu_count() or 1))


def cpu_probe() -> CpuProbe:
    """This machine's probe: from memory, else the cache file, else measured now (once) and cached.

    A file lock makes concurrent first runs (e.g. torchrun ranks) measure once, without each other's
    load, and agree. To measure again (say the first probe ran on a busy machine), delete the file.
    """
    path = cache_home() / PROBE_FILE
    key = f"{cpu_model_name()} | torch {torch.__version__}"
    if (str(path), key) not in _probes:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            cached = json.loads(path.read_text()) if path.is_file() else {}
            if key not in cached:
                cached[key] = asdict(probe_cpu())
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cached, indent=2) + "\n")
                tmp.replace(path)  # atomic: readers never see half a file
        _probes[str(path), key] = CpuProbe(**cached[key])
    return _probes[str(path), key]


def resolve(choice: str, device: torch.device, setting: str = "mixed_precision") -> str:
    """`auto` -> "bf16" on GPUs that support it and on CPUs where the probe measured it faster, else "fp32"."""
    if choice not in CHOICES:
        raise ConfigError(f"{setting} must be one of {', '.join(CHOICES)}; got {choice!r}")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return cpu_probe().choice if device.type == "cpu" else "fp32"


def explain(choice: str, device: torch.device, setting: str = "mixed_precision") -> str:
    """One log line: what `choice` resolves to on `device`, and why (the probe's measured ratio on CPU)."""
    resolved = resolve(choice, device, setting)
    if choice != "auto":
        why = f"{setting}={choice}"
    elif device.type == "cuda":
        why = f"auto: {torch.cuda.get_device_name(device)} {'supports' if resolved == 'bf16' else 'lacks'} bf16"
    elif device.type != "cpu":
        why = f"auto: no bf16 rule for {device.type}"
    else:
        probe = cpu_probe()
        if not probe.native_bf16:
            why = f"auto: {probe.cpu} has no native bf16"
        else:
            why = f"bf16 {probe.ratio:.2f}x fp32 on {probe.cpu}, probed {probe.probed}"
            why += f" under load {probe.load:.1f} per core" if probe.load >= 1 else ""
            why += "" if resolved == "bf16" else f"; bf16 needs >= {MARGIN}x"
    return f"precision: {resolved} ({why})"


def store_frozen_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not train; trainable ones keep their (fp32) master copies."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def lora_input_casts_off(model: torch.nn.Module, autocast: bool):
    """A context in which peft's LoRA layers of `model` leave their input's dtype to autocast, when
    the step runs under autocast (every precision but fp32); otherwise nothing."""
    return disable_input_dtype_casting(model, active=autocast)


def attention_kernels(device: torch.device, precision: str, stage: int):
    """A context choosing the attention kernel for training steps (see the module docstring).

    Stage 2 only: there the LM's causal self-attention dominates (1.10x faster at the paper sizes, 1.5x
    at the offline preset's), while stage 1's Q-Former cross-attention ran 11% slower with it.
    """
    if device.type == "cpu" and precision == "bf16" and stage == 2:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()

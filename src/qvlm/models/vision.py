"""The frozen vision encoder: any transformers vision backbone, returning patch features [B, P, Dv].

Works with ViT, DINOv2, CLIP and SigLIP vision towers (anything whose forward returns
`last_hidden_state`). The backbone is put in eval mode, its parameters never require gradients, and it
is never handed to an optimizer. A smaller input size than the backbone's own is allowed: position
embeddings are interpolated (ViT/CLIP/SigLIP via `interpolate_pos_encoding`, DINOv2 always does).
"""

from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoImageProcessor, AutoModel

from qvlm import hub
from qvlm.config import VisionConfig
from qvlm.models.tiny import random_model
from qvlm.precision import resolve as resolve_precision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FrozenVisionEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, image_size: int, mean, std, weights_id: str, precision: str = "fp32"):
        super().__init__()
        # CLIP/SigLIP checkpoints hold a full dual model; keep only the vision tower.
        self.backbone = getattr(backbone, "vision_model", backbone)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.weights_id = weights_id
        self.precision = precision  # a `VisionConfig.precision` choice, resolved for the current device
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.backbone.forward).parameters
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @classmethod
    def build(cls, cfg: VisionConfig, device: str | torch.device = "cpu") -> FrozenVisionEncoder:
        if cfg.random_init is not None:
            backbone = random_model(AutoModel, cfg.random_init, device=device)
            native = backbone.config.image_size
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            weights_id = hashlib.sha256(json.dumps(cfg.random_init, sort_keys=True).encode()).hexdigest()[:12]
        else:
            backbone = hub.from_pretrained(AutoModel.from_pretrained, cfg.name, "vision encoder",
                                           use_safetensors=True)
            processor = hub.from_pretrained(AutoImageProcessor.from_pretrained, cfg.name, "image processor")
            native = _processor_size(processor) or backbone.config.image_size
            mean, std = processor.image_mean, processor.image_std
            weights_id = cfg.name
        resolve_precision(cfg.precision, torch.device(device), "vision.precision")  # fails here, not mid-run
        return cls(backbone, cfg.image_size or native, mean, std, weights_id, cfg.precision)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype features are computed in on the current device; None for fp32."""
        return _AUTOCAST_DTYPES.get(resolve_precision(self.precision, self.device))

    @property
    def cache_key(self) -> str:
        """Identifies (weights, input size, arithmetic): keys the on-disk feature cache."""
        key = f"{self.weights_id}@{self.image_size}px"
        return key if self.compute_dtype is None else f"{key}+{str(self.compute_dtype).removeprefix('torch.')}"

    @property
    def width(self) -> int:
        """Dv, the feature width."""
        return self.backbone.config.hidden_size

    @property
    def patch_grid(self) -> int:
        """Patches per side of the square input; the features' last `patch_grid ** 2` tokens are the
        patches in raster order (any CLS or register tokens come first)."""
        return self.image_size // self.backbone.config.patch_size

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        # Frozen means frozen: dropout and friends stay off even when the wrapping model trains.
        return super().train(False)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images (any size) -> normalised pixels [B, 3, S, S], S = image_size (bicubic resize)."""
        arrays = [
            np.asarray(img.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC))
            for img in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return (pixels - self.mean.cpu()) / self.std.cpu()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> fp32 patch features [B, P, Dv] (P includes the CLS token if any).

        With `precision` bf16 (or `auto` on bf16 hardware) the encoder runs under bf16 autocast: faster
        on GPUs and AMX CPUs, features within ~1% of fp32 (docs/BENCHMARKS.md, "Feature extraction in bf16").
        """
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        pixel_values = pixel_values.to(self.device, dtype=next(self.backbone.parameters()).dtype)
        dtype = self.compute_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self.backbone(pixel_values=pixel_values, **kwargs).last_hidden_state.float()


def _processor_size(processor) -> int | None:
    """The square input side an image processor produces (crop size if it crops, else its resize)."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if attr == "crop_size" and not getattr(processor, "do_center_crop", False):
            continue
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        if isinstance(size, int):
            return size
    return None

"""`QVLMPretrainedConfig`: the model folder's config.json, a transformers config with `model_type="qvlm"`.

It carries our nested `QVLMConfig` as sub-configs (vision / Q-Former / LM / LoRA, as transformers'
composite configs carry `vision_config` and `text_config`) plus what the weights need to be rebuilt: the
stage and the Q-Former's text-encoder shape. `to_qvlm_config()` gives back the exact `QVLMConfig`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from qvlm.config import QVLMConfig

FORMAT_VERSION = 2  # 1: qvlm.json + our own nested config.json, LoRA inside model.safetensors
MODEL_TYPE = "qvlm"
_LORA_FIELDS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "lora_targets"}


class QVLMPretrainedConfig(PreTrainedConfig):
    """vision_config / qformer_config / lm_config / lora_config: the `QVLMConfig` sections (dicts);
    training_config: its other sections (preset, stage1, stage2, train, ...); qformer_spec: the text encoder's
    shape (`TextEncoderSpec`); stage: 1 (Q-Former only) or 2 (with the LM)."""

    model_type = MODEL_TYPE

    vision_config: dict | None = None
    qformer_config: dict | None = None
    lm_config: dict | None = None
    lora_config: dict | None = None
    training_config: dict | None = None
    qformer_spec: dict | None = None
    stage: int = 2
    qvlm_format_version: int = FORMAT_VERSION

    @classmethod
    def from_qvlm_config(cls, config: QVLMConfig, stage: int, qformer_spec: dict, **kwargs) -> QVLMPretrainedConfig:
        data = config.to_dict()
        lm = data.pop("lm")
        lora = {ours: lm.pop(theirs) for ours, theirs in _LORA_FIELDS.items()}
        vision, qformer = data.pop("vision"), data.pop("qformer")
        return cls(vision_config=vision, qformer_config=qformer, lm_config=lm, lora_config=lora, training_config=data, qformer_spec=dict(qformer_spec), stage=stage,
                   architectures=[_ARCHITECTURES[stage]], **kwargs)

    def to_qvlm_config(self) -> QVLMConfig:
        lm = dict(self.lm_config) | {theirs: self.lora_config[ours] for ours, theirs in _LORA_FIELDS.items()}
        return QVLMConfig.from_dict({**self.training_config, "vision": self.vision_config,
                                     "qformer": self.qformer_config, "lm": lm})


_ARCHITECTURES = {1: "QVLMForImageTextRetrieval", 2: "QVLMForConditionalGeneration"}


"""transformers model classes around `QVLM`, registered with the Auto classes by `import qvlm`.

    QVLMForConditionalGeneration   stage 2: processor inputs -> LM output / generated tokens
    QVLMForImageTextRetrieval      the Q-Former's ITC embeddings and ITM score (any stage)

Both hold the `QVLM` module as `.qvlm` and load and save its folders (docs/inference.md#model-folders),
so `AutoModelForImageTextToText.from_pretrained(run)` and `QVLM.from_pretrained(run)` give one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from qvlm.errors import QVLMError
from qvlm.models.configuration import MODEL_TYPE, QVLMPretrainedConfig
from qvlm.models.processing import QVLMProcessor
from qvlm.models.vlm import QVLM

# What the Auto classes pass along that a local qvlm folder does not need.
_AUTO_KWARGS = {"_from_auto", "trust_remote_code", "code_revision", "adapter_kwargs", "revision", "subfolder",
                "cache_dir", "force_download", "local_files_only", "proxies", "token"}


class QVLMPreTrainedModel(PreTrainedModel):
    config_class = QVLMPretrainedConfig
    base_model_prefix = "qvlm"
    main_input_name = "pixel_values"
    required_stage: int | None = None

    def __init__(self, config: QVLMPretrainedConfig, qvlm: QVLM | None = None):
        super().__init__(config)
        # Built from the config alone, the backbones are pretrained (or random for `random_init` parts) and
        # the trained parts fresh: `from_pretrained` is what loads a trained model.
        self.qvlm = qvlm if qvlm is not None else QVLM.build(config.to_qvlm_config(), stage=config.stage)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args, config=None,
                        device: str | torch.device = "cpu", **kwargs):
        """A model folder, a run folder (its model/), or a hub repo id (downloaded with huggingface_hub)."""
        unknown = sorted(set(kwargs) - _AUTO_KWARGS)
        if model_args or unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained takes a path and `device`; got {unknown or model_args}")
        folder = _local_folder(str(pretrained_model_name_or_path), kwargs)
        qvlm = QVLM.from_pretrained(folder, device=device)
        if cls.required_stage is not None and qvlm.stage != cls.required_stage:
            raise QVLMError(f"{pretrained_model_name_or_path} is a stage-{qvlm.stage} model (Q-Former only); load it "
                            "with qvlm.QVLMForImageTextRetrieval, or train stage 2 to caption and answer")
        return cls(qvlm.pretrained_config(), qvlm).eval()

    def save_pretrained(self, save_directory: str | Path, export_full: bool = False, **kwargs) -> None:
        """`QVLM.save_pretrained` (transformers' hub options are not supported here: use `qvlm push`)."""
        if kwargs:
            raise TypeError(f"unsupported save_pretrained options: {', '.join(sorted(kwargs))}")
        self.qvlm.save_pretrained(save_directory, export_full=export_full)


def _local_folder(name: str, kwargs: dict) -> Path:
    if Path(name).exists():
        return Path(name)
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if kwargs.get(k) is not None}
    return Path(snapshot_download(name, **hub))


class QVLMForConditionalGeneration(QVLMPreTrainedModel, GenerationMixin):
    """Stage 2: `model.generate(**processor(images=..., text=...), **any_generation_kwargs)`."""

    required_stage = 2

    def __init__(self, config: QVLMPretrainedConfig, qvlm: QVLM | None = None):
        super().__init__(config, qvlm)
        self.generation_config = self.qvlm.generation_config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None, **kwargs):
        """Processor outputs (+ labels [B, L]) -> the LM's output with logits [B, L, V] (`.loss` with labels)."""
        features = image_features if image_features is not None else self.qvlm.vision(pixel_values)
        return self.qvlm(features, input_ids, attention_mask, image_mask, labels=labels, all_logits=True,
                         qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)

    def generate(self, **kwargs):
        """`QVLM.generate`: new-token ids [B * num_return_sequences, T]; every generation argument passes."""
        return self.qvlm.generate(**kwargs)


@dataclass
class QVLMRetrievalOutput(ModelOutput):
    """itm_score [B]: match probability of each aligned (image, text) pair; similarity [Bi, Bt]: ITC
    cosine similarity of every image with every text (the one asked for is set)."""

    itm_score: torch.Tensor | None = None
    similarity: torch.Tensor | None = None


class QVLMForImageTextRetrieval(QVLMPreTrainedModel):
    """The Q-Former's retrieval heads (stage 1 or 2 folders). Texts use the Q-Former's tokenizer:
    `AutoTokenizer.from_pretrained(path, subfolder="qformer_tokenizer")` or `model.qvlm.text_tokenizer`."""

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> L2-normalised ITC embeddings per query [B, Nq, E]."""
        return self.qvlm.qformer.image_embeds(self.qvlm.vision(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> L2-normalised ITC embedding of each text [B, E]."""
        return self.qvlm.qformer.text_embeds(input_ids.to(self.qvlm.device), attention_mask.to(self.qvlm.device))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                use_itm_head: bool = True) -> QVLMRetrievalOutput:
        """ITM: pairs row by row (as Blip2ForImageTextRetrieval); ITC: every image against every text."""
        if use_itm_head:
            device = self.qvlm.device
            scores = self.qvlm.qformer.itm_scores(self.qvlm.vision(pixel_values), input_ids.to(device),
                                                  attention_mask.to(device))
            return QVLMRetrievalOutput(itm_score=scores)
        similarity = self.qvlm.qformer.similarity(self.get_image_features(pixel_values),
                                                  self.get_text_features(input_ids, attention_mask))
        return QVLMRetrievalOutput(similarity=similarity)


def register_auto_classes() -> None:
    """AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor know `model_type="qvlm"`."""
    AutoConfig.register(MODEL_TYPE, QVLMPretrainedConfig, exist_ok=True)
    AutoModel.register(QVLMPretrainedConfig, QVLMForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(QVLMPretrainedConfig, QVLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(QVLMPretrainedConfig, QVLMProcessor, exist_ok=True)

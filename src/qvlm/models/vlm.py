"""The whole model: frozen vision encoder -> Q-Former -> adapter -> LoRA-tuned causal LM.

    image ─► FrozenVisionEncoder ─► features [B, P, Dv]
    features ─► QFormer.image_queries ─► [B, Nq, Dq] ─► adapter (MLP) ─► [B, Nq, Dlm]
              (instruction-aware: QFormer.instructed_queries, the user's text read alongside)
    the Nq adapter outputs replace the image-slot embeddings of the prompt (see data/sequences.py)

A stage-1 model has no LM (`lm is None`): it is the Q-Former and its heads, for retrieval.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from qvlm import hub
from qvlm.config import LMConfig, QVLMConfig
from qvlm.data.prompts import DEFAULT_CAPTION_PROMPT
from qvlm.data.sequences import IGNORE, build_stage2_batch, qformer_text_inputs
from qvlm.errors import QVLMError
from qvlm.models.qformer import QFormer, TextEncoderSpec
from qvlm.models.tiny import random_model, tiny_lm_tokenizer
from qvlm.models.vision import FrozenVisionEncoder

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def build_adapter(qformer_width: int, lm_width: int, hidden: int | None = None) -> nn.Sequential:
    """The article's adapter: Linear(Dq -> H) -> ReLU -> Linear(H -> Dlm), H = Dlm by default."""
    hidden = hidden or lm_width
    return nn.Sequential(nn.Linear(qformer_width, hidden), nn.ReLU(), nn.Linear(hidden, lm_width))


def build_lm(cfg: LMConfig, device: str | torch.device = "cpu", weights_from: str | None = None):
    """The frozen causal LM wrapped with LoRA (peft). Returns (peft_model, tokenizer)."""
    source = weights_from or cfg.name
    if cfg.random_init is not None and weights_from is None:
        lm = random_model(AutoModelForCausalLM, cfg.random_init, device=device)
        tokenizer = tiny_lm_tokenizer() if cfg.tokenizer is None else hub.from_pretrained(
            AutoTokenizer.from_pretrained, cfg.tokenizer, "LM tokenizer")
    else:
        lm = hub.from_pretrained(AutoModelForCausalLM.from_pretrained, source, "language model",
                                 dtype=getattr(torch, cfg.dtype), use_safetensors=True)
        tokenizer = hub.from_pretrained(AutoTokenizer.from_pretrained, weights_from or cfg.tokenizer or cfg.name,
                                        "LM tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(lm, lora), tokenizer


class QVLM(nn.Module):
    def __init__(self, config: QVLMConfig, vision: FrozenVisionEncoder, qformer: QFormer, text_tokenizer,
                 lm=None, tokenizer=None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.qformer = qformer
        self.text_tokenizer = text_tokenizer
        self.lm = lm
        self.tokenizer = tokenizer
        self.adapter = None
        if lm is not None:
            lm_width = lm.get_base_model().config.hidden_size
            self.adapter = build_adapter(qformer.spec.hidden, lm_width, config.lm.adapter_hidden)
        self._generate_lock = threading.Lock()  # generate() is not thread-safe; callers queue here

    @classmethod
    def build(cls, config: QVLMConfig, stage: int = 2, device: str | torch.device = "cpu") -> QVLM:
        """Build from a config: pretrained backbones (or random ones for `random_init` parts).
        `stage=1` leaves out the LM. `device="meta"` allocates nothing (parameter counting)."""
        vision = FrozenVisionEncoder.build(config.vision, device=device)
        qformer, text_tokenizer = QFormer.build(config.qformer, vision.width, device=device)
        lm = tokenizer = None
        if stage == 2:
            lm, tokenizer = build_lm(config.lm, device=device)
        with torch.device(device):
            model = cls(config, vision, qformer, text_tokenizer, lm, tokenizer)
        return model

    @property
    def stage(self) -> int:
        return 1 if self.lm is None else 2

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups by part; the frozen vision encoder and LM base weights never appear."""
        groups = {"qformer": [p for p in self.qformer.parameters() if p.requires_grad]}
        if self.lm is not None:
            groups["adapter"] = list(self.adapter.parameters())
            groups["lora"] = [p for p in self.lm.parameters() if p.requires_grad]
        return groups

    # -- stage 2 forward -----------------------------------------------------------------------------

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> patch features [B, P, Dv] on the model's device."""
        return self.vision(self.vision.preprocess(images).to(self.device))

    def image_prefix(self, features: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                     qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch features [B, P, Dv] -> LM-space image embeddings [B, Nq, Dlm].

        An instruction-aware model also reads the user's text in the Q-Former's vocabulary ([B, T],
        from `qformer_text_inputs`)."""
        features = features.to(self.device)
        if not self.config.qformer.instruction_aware:
            return self.adapter(self.qformer.image_queries(features))
        if qformer_input_ids is None:
            raise QVLMError("this model is instruction-aware: pass the prompts' Q-Former tokens "
                            "(qformer_input_ids, qformer_attention_mask)")
        return self.adapter(self.qformer.instructed_queries(features, qformer_input_ids.to(self.device),
                                                            qformer_attention_mask.to(self.device)))

    def embed_inputs(self, features: torch.Tensor, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     **qformer_text: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, Dlm] with the image-slot positions replaced by the image prefix."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        prefix = self.image_prefix(features, **qformer_text).to(embeds.dtype)  # [B, Nq, Dlm]
        return embeds.masked_scatter(image_mask[..., None], prefix)

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor | None = None, all_logits: bool = False,
                qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None):
        """Batch from `Stage2Collator` -> the LM's output; `.loss` is the mean cross-entropy over the
        labelled (answer + EOS) tokens. Instruction-aware models also take the prompts' Q-Former tokens.

        With labels, logits [B, K, V] cover only the last K positions, the shortest window holding every
        labelled target (answers end the left-padded rows): the vocabulary projection and its softmax
        over ~49k tokens are a fifth of the LM's FLOPs per position, and most positions are prompt.
        `all_logits=True` computes them everywhere ([B, L, V]), as `transformers` does.
        """
        embeds = self.embed_inputs(features, input_ids, image_mask, qformer_input_ids=qformer_input_ids,
                                   qformer_attention_mask=qformer_attention_mask)
        # Left padding: positions count real tokens only, so padded and unpadded rows see the same ones.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if labels is None or all_logits:
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           labels=labels)
        length = labels.shape[1]
        window = length - int((labels != IGNORE).int().argmax(-1).min())  # targets in the last `window`
        window = min(window, length - 1)
        # Logits at positions t predict the token at t + 1; an index tensor (not a slice) keeps the
        # selected hidden states contiguous, which the CPU matmul needs to stay fast.
        predicting = torch.arange(length - window - 1, length - 1, device=labels.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                      logits_to_keep=predicting)
        out.loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels[:, -window:].flatten(),
                                   ignore_index=IGNORE)
        return out

    # -- generation ----------------------------------------------------------------------------------

    def _generation_inputs(self, features: torch.Tensor, user_texts: list[str]) -> dict:
        lm_cfg = self.config.lm
        batch = build_stage2_batch(self.tokenizer, user_texts, None, self.qformer.num_queries,
                                   lm_cfg.image_position, lm_cfg.system_prompt)
        qformer_text = qformer_text_inputs(self.text_tokenizer, user_texts, self.config.qformer.max_text_len) \
            if self.config.qformer.instruction_aware else {}
        batch = {k: v.to(self.device) for k, v in (batch | qformer_text).items()}
        embeds = self.embed_inputs(features, batch["input_ids"], batch["image_mask"],
                                   **{k: batch[k] for k in qformer_text})
        return {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}

    def _generation_kwargs(self, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                           num_beams: int = 1, repetition_penalty: float = 1.0) -> dict:
        sample = temperature > 0
        kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": sample,
                  "repetition_penalty": repetition_penalty, "eos_token_id": self.tokenizer.eos_token_id,
                  "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:  # don't inherit sampling settings from the LM's generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.no_grad()
    def generate_from_features(self, features: torch.Tensor, user_texts: list[str], **gen) -> list[str]:
        """Greedy by default; `temperature>0` samples (with top_p), `num_beams>1` beam search."""
        self._require_lm()
        with self._generate_lock:
            out = self.lm.generate(**self._generation_inputs(features, user_texts), **self._generation_kwargs(**gen))
        # With inputs_embeds only, generate returns just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def answer(self, images: list[Image.Image], user_texts: list[str], **gen) -> list[str]:
        return self.generate_from_features(self.encode_images(images), user_texts, **gen)

    def caption(self, images: list[Image.Image], prompt: str = DEFAULT_CAPTION_PROMPT, **gen) -> list[str]:
        return self.answer(images, [prompt] * len(images), **gen)

    def stream(self, image: Image.Image, user_text: str, **gen) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (one image, one prompt)."""
        self._require_lm()
        features = self.encode_images([image])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            inputs = self._generation_inputs(features, [user_text])
        stop = threading.Event()  # set when the caller stops reading (a client that left)
        kwargs = {**inputs, **self._generation_kwargs(**gen), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)])}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._generate_lock, torch.no_grad():
                    self.lm.generate(**kwargs)
            except BaseException as e:  # surfaced to the caller below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:  # closed early: stop generating at the next token and free the model for the next job
            stop.set()
        worker.join()
        if errors:
            raise errors[0]

    def _require_lm(self) -> None:
        if self.lm is None:
            raise QVLMError("this is a stage-1 model (Q-Former only): train stage 2 to caption or answer")

    # -- save / load ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, export_full: bool = False) -> None:
        """Write config.json, qvlm.json and model.safetensors (trainable parts) into `path`.

        Frozen backbones are referenced by name, not copied, unless `export_full` or they were randomly
        initialised (then they are saved as `vision/` and `lm/` transformers folders). Files are written
        to a temporary folder and renamed into place, so an interrupted save never leaves a folder that
        looks complete.
        """
        from qvlm.utils import atomic_folder

        config = QVLMConfig.from_dict(self.config.to_dict())
        with atomic_folder(path) as tmp:
            weights = {f"qformer.{k}": v for k, v in self.qformer.state_dict().items()}
            if self.lm is not None:
                weights |= {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
                weights |= {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.lm).items()}
                self.tokenizer.save_pretrained(tmp / "tokenizer")
                if export_full or config.lm.random_init is not None:
                    self._save_base_lm(tmp / "lm")
            self.text_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
            if export_full or config.vision.random_init is not None:
                self._save_vision(tmp / "vision")
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS_FILE,
                      metadata={"format": "pt"})
            meta = {"format_version": FORMAT_VERSION, "stage": self.stage,
                    "qformer_spec": vars(self.qformer.spec)}
            (tmp / "qvlm.json").write_text(json.dumps(meta, indent=2) + "\n")
            config.save(tmp / "config.json")

    def _save_vision(self, folder: Path) -> None:
        from transformers import ViTImageProcessor

        self.vision.backbone.save_pretrained(folder)
        size = self.vision.image_size
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=self.vision.mean.flatten().tolist(),
                          image_std=self.vision.std.flatten().tolist()).save_pretrained(folder)

    def _save_base_lm(self, folder: Path) -> None:
        base = self.lm.get_base_model()
        weights = {k.replace(".base_layer", ""): v.detach().contiguous().cpu()
                   for k, v in base.state_dict().items() if "lora_" not in k}
        if base.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)  # tied to the input embeddings; safetensors refuses shared storage
        folder.mkdir(parents=True)
        base.config.save_pretrained(folder)
        save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> QVLM:
        """Load a folder written by `save_pretrained` (or a run folder holding one in `model/`)."""
        folder = model_folder(Path(path))
        meta = json.loads((folder / "qvlm.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise QVLMError(f"{folder} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        config = QVLMConfig.load(folder / "config.json")
        if (folder / "vision").is_dir():
            config.vision.name, config.vision.random_init = str(folder / "vision"), None
        vision = FrozenVisionEncoder.build(config.vision)
        qformer = QFormer(config.qformer, TextEncoderSpec(**meta["qformer_spec"]), vision.width)
        text_tokenizer = hub.from_pretrained(AutoTokenizer.from_pretrained, str(folder / "qformer_tokenizer"),
                                             "Q-Former tokenizer")
        lm = tokenizer = None
        if meta["stage"] == 2:
            lm_folder = folder / "lm"
            lm, tokenizer = build_lm(config.lm, weights_from=str(lm_folder) if lm_folder.is_dir() else None)
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        model = cls(config, vision, qformer, text_tokenizer, lm, tokenizer)
        model.load_trainable(load_file(folder / WEIGHTS_FILE), source=str(folder))
        return model.to(device).eval()

    def load_trainable(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Load the `qformer.` / `adapter.` / `lora.` weights written by `save_pretrained`."""
        parts = {"qformer": {}, "adapter": {}, "lora": {}}
        for key, value in weights.items():
            part, _, name = key.partition(".")
            if part not in parts:
                raise QVLMError(f"{source}: unexpected weight {key!r}; is this a qvlm model folder?")
            parts[part][name] = value
        try:
            self.qformer.load_state_dict(parts["qformer"])
            if self.lm is not None:
                self.adapter.load_state_dict(parts["adapter"])
                result = set_peft_model_state_dict(self.lm, parts["lora"])
                if not parts["lora"] or getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"LoRA weights do not fit the LM (unexpected: {result.unexpected_keys})")
        except RuntimeError as e:
            raise QVLMError(f"{source}: weights do not match the config: {str(e).splitlines()[0]}") from e


class _StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set (every row of the batch)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def model_folder(path: Path) -> Path:
    for candidate in (path, path / "model"):
        if (candidate / "qvlm.json").is_file():
            missing = [f for f in ("config.json", WEIGHTS_FILE) if not (candidate / f).is_file()]
            if missing:
                raise QVLMError(f"{candidate} is incomplete: missing {', '.join(missing)}")
            return candidate
    if not path.exists():
        raise QVLMError(f"no such model or run folder: {path}")
    raise QVLMError(f"{path} is not a qvlm model folder (no qvlm.json); pass a run folder or its model/ folder")

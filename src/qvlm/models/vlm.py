"""The whole model: frozen vision encoder -> Q-Former -> adapter -> LoRA-tuned causal LM.

    image ─► FrozenVisionEncoder ─► features [B, P, Dv]
    features ─► QFormer.image_queries ─► [B, Nq, Dq] ─► adapter (MLP) ─► [B, Nq, Dlm]
              (instruction-aware: QFormer.instructed_queries, the user's text read alongside)
    the Nq adapter outputs replace the image-slot embeddings of the prompt (see models/processing.py)

A stage-1 model has no LM (`lm is None`): it is the Q-Former and its heads, for retrieval.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from qvlm import hub
from qvlm.config import LMConfig, QVLMConfig
from qvlm.errors import QVLMError
from qvlm.models.configuration import FORMAT_VERSION, MODEL_TYPE, QVLMPretrainedConfig
from qvlm.models.dropout import use_fast_dropout
from qvlm.models.processing import (
    DEFAULT_CAPTION_PROMPT,
    IGNORE,
    QVLMProcessor,
    completion_lengths,
    image_processor_for,
    is_caption_request,
    qformer_text_inputs,
    with_description,
)
from qvlm.models.qformer import QFormer, TextEncoderSpec
from qvlm.models.tiny import random_model, tiny_lm_tokenizer
from qvlm.models.vision import FrozenVisionEncoder

DESCRIPTION_TOKENS = 32  # `lm.describe_first`: the longest description generated before an answer
WEIGHTS_FILE = "model.safetensors"  # the Q-Former's and the adapter's weights (`qformer.*`, `adapter.*`)
LORA_FOLDER = "lora"  # the LoRA as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)


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
    lm = get_peft_model(lm, lora)
    use_fast_dropout(lm)  # peft's LoRA dropouts: their masks were a fifth of a CPU step
    return lm, tokenizer


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
            # Ours replaces the LM's own: an instruct LM's sampling defaults would otherwise leak into `generate`.
            lm.get_base_model().generation_config = default_generation_config(config, tokenizer)
        self._processor: QVLMProcessor | None = None
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

    @torch.no_grad()
    def patch_attention(self, features: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        """Where each query looks: patch features [B, P, Dv] -> [B, Nq, G, G], the Q-Former's cross-attention
        over the G x G patch grid (`vision.patch_grid`), averaged over heads and layers.

        Each map sums to 1: the share of CLS / register tokens is dropped and the rest renormalised, so
        maps show where on the image a query looks however much it also reads those tokens. An
        instruction-aware model's queries read `texts` (one per image; the caption prompt by default),
        as they do when answering (with `lm.describe_first`, behind the image's description); other
        models ignore them."""
        text = {}
        if self.config.qformer.instruction_aware:
            texts = self.described(features, texts or [DEFAULT_CAPTION_PROMPT] * len(features))
            tokens = qformer_text_inputs(self.text_tokenizer, texts, self.config.qformer.max_text_len)
            text = {"input_ids": tokens["qformer_input_ids"].to(self.device),
                    "text_mask": tokens["qformer_attention_mask"].to(self.device)}
        maps = self.qformer.query_attention(features.to(self.device), **text)  # [B, Nq, P]
        side = self.vision.patch_grid
        patches = maps[..., -side * side:]  # [B, Nq, G*G]: the patches come last, in raster order
        patches = patches / patches.sum(-1, keepdim=True)
        return patches.reshape(*maps.shape[:2], side, side)

    @torch.no_grad()
    def word_query_attention(self, features: torch.Tensor, user_texts: list[str],
                             **generate_kwargs) -> list[dict[str, list[str] | torch.Tensor]]:
        """Which queries each generated word drew on: encoded images [B, P, Dv] and one user text each ->
        one dict per sample: `tokens`, the T generated tokens as text pieces (EOS left out; other special
        tokens by name), `queries` [T, Nq] and `image_share` [T] (float32, CPU).

        The answer is generated as `generate_text` does (greedy by default; `generate_kwargs` pass
        through), then the LM reads prompt + answer once more, on eager attention for that pass only
        (SDPA returns no weights). Row t is the attention of the position that chose token t (the one
        before it: the prompt's last position chose the first token), averaged over heads and layers.
        `image_share[t]` is the part of that row on the Nq image slots, of the row's whole attention
        (0..1); `queries[t]` is that part divided by `image_share[t]`, so each row sums to 1: how the
        token's image attention splits over the queries, however little of it there is."""
        self._require_lm()
        inputs = self.processor(text=self.described(features, user_texts))
        new_ids = self.generate(**inputs, image_features=features, **generate_kwargs).cpu()  # [B, T]
        counts, stopped = completion_lengths(new_ids, self.tokenizer.eos_token_id)
        generated = torch.arange(new_ids.shape[1]) < torch.tensor(counts)[:, None]  # [B, T]: False after EOS
        device = self.device
        attention_mask = torch.cat([inputs["attention_mask"], generated.long()], 1).to(device)  # [B, L + T]
        image_mask = F.pad(inputs["image_mask"], (0, new_ids.shape[1])).to(device)  # [B, L + T]
        input_ids = torch.cat([inputs["input_ids"], new_ids], 1).to(device)  # [B, L + T]
        qformer_text = {k: v.to(device) for k, v in inputs.items() if k.startswith("qformer_")}
        embeds = self.embed_inputs(features, input_ids, image_mask, **qformer_text)  # [B, L + T, Dlm]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as `forward`: padding not counted
        base = self.lm.get_base_model()
        previous = base.config._attn_implementation
        with self._generate_lock:  # no generate may run while the LM is switched to eager
            base.set_attn_implementation("eager")
            try:
                out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              output_attentions=True, logits_to_keep=1)
            finally:
                base.set_attn_implementation(previous)
        attention = torch.stack(out.attentions).float().mean((0, 2))  # [layers, B, H, S, S] -> [B, S, S]
        choosing = attention[:, inputs["input_ids"].shape[1] - 1:-1]  # [B, T, S]: rows L-1 .. L+T-2
        on_slots = torch.stack([rows[:, slots] for rows, slots in zip(choosing, image_mask, strict=True)])
        image_share = on_slots.sum(-1).cpu()  # [B, T]
        queries = on_slots.cpu() / image_share[..., None]  # [B, T, Nq]
        words = [n - int(eos) for n, eos in zip(counts, stopped, strict=True)]  # EOS is no word of the answer
        samples = zip(new_ids, words, queries, image_share, strict=True)
        return [{"tokens": [self.tokenizer.decode(t) for t in ids[:n]], "queries": q[:n],
                 "image_share": share[:n]} for ids, n, q, share in samples]

    def embed_inputs(self, features: torch.Tensor, input_ids: torch.Tensor, image_mask: torch.Tensor,
                     **qformer_text: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, Dlm] with the image-slot positions replaced by the image prefix."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        prefix = self.image_prefix(features, **qformer_text).to(embeds.dtype)  # [B, Nq, Dlm]
        return embeds.masked_scatter(image_mask[..., None], prefix)

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor, labels: torch.Tensor | None = None, all_logits: bool = False,
                qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None, return_loss: bool = True):
        """Batch from `Stage2Collator` -> the LM's output; `.loss` is the mean cross-entropy over the
        labelled (answer + EOS) tokens. Instruction-aware models also take the prompts' Q-Former tokens.
        `return_loss=False` leaves the loss to the caller (`Stage2Objective` splits it in parts).

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
        if return_loss:  # over the labelled rows alone, as Stage2Objective computes it
            targets = labels[:, -window:]  # [B, K]
            labelled = targets != IGNORE
            out.loss = F.cross_entropy(out.logits[labelled].float(), targets[labelled])
        return out

    # -- generation ----------------------------------------------------------------------------------

    @property
    def processor(self) -> QVLMProcessor:
        """Images and user texts -> this model's `generate` inputs: `model.processor(images=..., text=...)`."""
        self._require_lm()
        if self._processor is None:
            image_processor = image_processor_for(self.vision.image_size, self.vision.mean.flatten().tolist(),
                                                  self.vision.std.flatten().tolist())
            cfg = self.config
            self._processor = QVLMProcessor(image_processor, self.tokenizer, self.text_tokenizer,
                                            num_query_tokens=self.qformer.num_queries,
                                            image_position=cfg.lm.image_position, system_prompt=cfg.lm.system_prompt,
                                            qformer_max_length=cfg.qformer.max_text_len,
                                            instruction_aware=cfg.qformer.instruction_aware)
        return self._processor

    @property
    def generation_config(self) -> GenerationConfig:
        """The defaults `generate` starts from (greedy unless the config's `generation` section says
        otherwise); written to generation_config.json."""
        self._require_lm()
        return self.lm.get_base_model().generation_config

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
                 **generate_kwargs):
        """`processor(...)` outputs -> the LM's `generate` on the prompt embeddings with the image inside.

        Pass `pixel_values` [B, 3, S, S], or `image_features` [B, P, Dv] already encoded (a feature
        cache). Every transformers generation argument passes through: num_beams, do_sample, top_k,
        top_p, min_new_tokens, no_repeat_ngram_size, num_return_sequences, streamer, stopping_criteria,
        return_dict_in_generate, ... (`with_sampling_rule`: temperature > 0 alone samples). Returns the
        new tokens only, [B * num_return_sequences, T] (rows that ended early are padded;
        `completion_lengths` counts each row's real tokens), or a transformers GenerateOutput with
        `return_dict_in_generate=True`.
        """
        self._require_lm()
        if image_features is None:
            if pixel_values is None:
                raise QVLMError("generate needs the images: pass pixel_values (from model.processor) or "
                                "image_features (from model.encode_images)")
            image_features = self.vision(pixel_values)
        device = self.device
        qformer_text = {}
        if qformer_input_ids is not None:
            qformer_text = {"qformer_input_ids": qformer_input_ids.to(device),
                            "qformer_attention_mask": qformer_attention_mask.to(device)}
        embeds = self.embed_inputs(image_features, input_ids.to(device), image_mask.to(device), **qformer_text)
        with self._generate_lock:  # the LM's generate is not thread-safe
            return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(device),
                                    **with_sampling_rule(generate_kwargs))

    def described(self, image_features: torch.Tensor, user_texts: list[str]) -> list[str]:
        """The user texts as the LM reads them: with `lm.describe_first`, each text that is not a caption
        request gets the model's own description of its image in front (greedy, one per distinct image:
        [B, P, Dv] rows that are equal share it); otherwise unchanged."""
        if not self.config.lm.describe_first:
            return list(user_texts)
        asking = [i for i, text in enumerate(user_texts) if not is_caption_request(text)]
        if not asking:
            return list(user_texts)
        images, which = torch.unique(image_features[asking].flatten(1), dim=0, return_inverse=True)
        descriptions = self.generate_text(images.view(-1, *image_features.shape[1:]),
                                          [DEFAULT_CAPTION_PROMPT] * len(images), max_new_tokens=DESCRIPTION_TOKENS,
                                          do_sample=False, num_beams=1).texts
        texts = list(user_texts)
        for i, image in zip(asking, which.tolist(), strict=True):
            texts[i] = with_description(descriptions[image], texts[i])
        return texts

    def generate_text(self, image_features: torch.Tensor, user_texts: list[str], **generate_kwargs) -> Completions:
        """Encoded images [B, P, Dv] and one user text each -> the decoded answers with their real token
        counts (`num_return_sequences=n` gives n answers per image, in order). With `lm.describe_first`,
        the model describes each image before answering a question about it (`described`)."""
        inputs = self.processor(text=self.described(image_features, user_texts))
        ids = self.generate(**inputs, image_features=image_features, **generate_kwargs)
        counts, stopped = completion_lengths(ids, self.tokenizer.eos_token_id)
        texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
        repeat = len(texts) // len(user_texts)  # num_return_sequences
        return Completions(texts, [n for n in prompt_tokens for _ in range(repeat)], counts, stopped)

    def generate_from_features(self, features: torch.Tensor, user_texts: list[str], **generate_kwargs) -> list[str]:
        """Encoded images [B, P, Dv] and one user text each -> the answers (greedy by default)."""
        return self.generate_text(features, user_texts, **generate_kwargs).texts

    def answer(self, images: list[Image.Image], user_texts: list[str], **generate_kwargs) -> list[str]:
        return self.generate_from_features(self.encode_images(images), user_texts, **generate_kwargs)

    def caption(self, images: list[Image.Image], prompt: str = DEFAULT_CAPTION_PROMPT, **generate_kwargs) -> list[str]:
        return self.answer(images, [prompt] * len(images), **generate_kwargs)

    def stream(self, image: Image.Image, user_text: str, streamer: TextIteratorStreamer | None = None,
               **generate_kwargs) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (one image, one prompt). Pass a
        `TokenCountingStreamer` to read the real token count afterwards."""
        self._require_lm()
        streamer = streamer or TokenCountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        features = self.encode_images([image])  # [1, P, Dv]
        inputs = {**self.processor(text=self.described(features, [user_text])), "image_features": features}
        if isinstance(streamer, TokenCountingStreamer):
            streamer.prompt_tokens = int(inputs["attention_mask"].sum())
        stop = threading.Event()  # set when the caller stops reading (a client that left)
        criteria = StoppingCriteriaList([_StopWhenSet(stop), *generate_kwargs.pop("stopping_criteria", [])])
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(**inputs, streamer=streamer, stopping_criteria=criteria, **generate_kwargs)
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

    def pretrained_config(self) -> QVLMPretrainedConfig:
        """This model's config.json: a transformers config (`model_type="qvlm"`) holding our config."""
        return QVLMPretrainedConfig.from_qvlm_config(self.config, self.stage, vars(self.qformer.spec))

    def save_pretrained(self, path: str | Path, export_full: bool = False, run_dir: str | Path | None = None) -> None:
        """Write a model folder that transformers and peft read (docs/inference.md#model-folders).

        config.json (`model_type` "qvlm"), model.safetensors (Q-Former and adapter), and for stage 2 the
        LoRA as a PEFT adapter folder (lora/), generation_config.json and the processor's files (the LM's
        tokenizer at the top, the Q-Former's in qformer_tokenizer/); README.md is a model card with the
        metrics of `run_dir` (by default the parent folder when it holds a metrics.jsonl: RUN/model).
        Frozen backbones are referenced by name, not copied, unless `export_full` or they were randomly
        initialised (then they are saved as `vision/` and `lm/` transformers folders). Files are written
        to a temporary folder and renamed into place, so an interrupted save never leaves a folder that
        looks complete.
        """
        from qvlm.models.card import write_model_card
        from qvlm.utils import atomic_folder

        path = Path(path)
        with atomic_folder(path) as tmp:
            weights = {f"qformer.{k}": v for k, v in self.qformer.state_dict().items()}
            if self.lm is not None:
                weights |= {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
                self.lm.save_pretrained(tmp / LORA_FOLDER)
                self.processor.save_pretrained(tmp)
                self.generation_config.save_pretrained(tmp)
                if export_full or self.config.lm.random_init is not None:
                    self._save_base_lm(tmp / "lm")
            else:  # no LM tokenizer: the image processor and the Q-Former's tokenizer on their own
                self.text_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
                image_processor_for(self.vision.image_size, self.vision.mean.flatten().tolist(),
                                    self.vision.std.flatten().tolist()).save_pretrained(tmp)
            if export_full or self.config.vision.random_init is not None:
                self._save_vision(tmp / "vision")
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS_FILE,
                      metadata={"format": "pt"})
            self.pretrained_config().save_pretrained(tmp)
            run_dir = Path(run_dir) if run_dir is not None else path.parent
            write_model_card(tmp, self, run_dir if (run_dir / "metrics.jsonl").is_file() else None)

    def _save_vision(self, folder: Path) -> None:
        self.vision.backbone.save_pretrained(folder)
        image_processor_for(self.vision.image_size, self.vision.mean.flatten().tolist(),
                            self.vision.std.flatten().tolist()).save_pretrained(folder)

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

    def merged_lm(self):
        """A plain transformers causal LM with the LoRA folded into its weights (a copy; this model is
        unchanged). It reads token ids only: the image path needs the QVLM around it."""
        self._require_lm()
        return copy.deepcopy(self.lm).merge_and_unload()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> QVLM:
        """Load a folder written by `save_pretrained` (or a run folder holding one in `model/`); folders
        of the earlier format (with qvlm.json) load too, and `qvlm export` rewrites them."""
        folder = model_folder(Path(path))
        config, stage, spec = read_config(folder)
        if (folder / "vision").is_dir():
            config.vision.name, config.vision.random_init = str(folder / "vision"), None
        vision = FrozenVisionEncoder.build(config.vision)
        qformer = QFormer(config.qformer, TextEncoderSpec(**spec), vision.width)
        text_tokenizer = hub.from_pretrained(AutoTokenizer.from_pretrained, str(folder / "qformer_tokenizer"),
                                             "Q-Former tokenizer")
        lm = tokenizer = None
        if stage == 2:
            lm_folder = folder / "lm"
            lm, tokenizer = build_lm(config.lm, weights_from=str(lm_folder) if lm_folder.is_dir() else None)
            legacy = (folder / LEGACY_META).is_file()
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer" if legacy else folder)
        model = cls(config, vision, qformer, text_tokenizer, lm, tokenizer)
        model.load_trainable(read_trainable(folder), source=str(folder))
        return model.to(device).eval()

    def load_trainable(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Load the `qformer.` / `adapter.` / `lora.` weights `read_trainable` returns."""
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


def default_generation_config(config: QVLMConfig, tokenizer) -> GenerationConfig:
    """Greedy decoding of at most 32 new tokens, or what the config's `generation` section sets."""
    section = getattr(config, "generation", None)
    settings = {k: v for k, v in vars(section).items() if v is not None} if section is not None else {}
    return GenerationConfig(**with_sampling_rule({"max_new_tokens": 32, **settings}),
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def with_sampling_rule(kwargs: dict) -> dict:
    """qvlm's rule over transformers' (its CLI flags, server fields and config): without an explicit
    `do_sample`, a temperature > 0 samples and a temperature of 0 decodes greedily (sampling settings
    dropped). transformers alone would ignore a temperature unless do_sample=True."""
    if "do_sample" in kwargs or "temperature" not in kwargs:
        return kwargs
    if kwargs["temperature"] and kwargs["temperature"] > 0:
        return kwargs | {"do_sample": True}
    return kwargs | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@dataclass
class Completions:
    """What `generate_text` produced, one entry per answer: the text, the prompt's token count (image
    slot included), the generated token count (EOS included) and whether it ended with EOS."""

    texts: list[str]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    stopped: list[bool]


class TokenCountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer (batch of one) that counts the tokens generated (`tokens`) and notes
    whether the last one was EOS (`stopped`); `QVLM.stream` sets `prompt_tokens`, the prompt as the LM
    read it (image slots and, with `lm.describe_first`, the description included)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.tokens = 0
        self.stopped = False
        self.prompt_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt) and value.numel():
            self.tokens += value.numel()
            self.stopped = int(value.reshape(-1)[-1]) == self.tokenizer.eos_token_id
        super().put(value)


class _StopWhenSet(StoppingCriteria):
    """Ends generation once `event` is set (every row of the batch)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


LEGACY_META = "qvlm.json"  # format 1: meta file beside our own nested config.json


def is_model_folder(path: Path) -> bool:
    """A folder written by `save_pretrained` (this format or the earlier one)."""
    config = path / "config.json"
    if (path / LEGACY_META).is_file():
        return True
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def model_folder(path: Path) -> Path:
    """The model folder of a run folder (RUN/model) or of a model folder itself. A run folder's own
    config.json is a model config too (so Auto classes accept RUN), hence RUN/model is tried first."""
    for candidate in (path / "model", path):
        if is_model_folder(candidate):
            missing = [f for f in ("config.json", WEIGHTS_FILE) if not (candidate / f).is_file()]
            if missing:
                raise QVLMError(f"{candidate} is incomplete: missing {', '.join(missing)}")
            return candidate
    if not path.exists():
        raise QVLMError(f"no such model or run folder: {path}")
    raise QVLMError(f"{path} is not a qvlm model folder (no config.json with model_type {MODEL_TYPE!r}); "
                    "pass a run folder or its model/ folder")


def read_config(folder: Path) -> tuple[QVLMConfig, int, dict]:
    """A model folder's (config, stage, Q-Former text-encoder shape), in either format."""
    if (folder / LEGACY_META).is_file():
        meta = json.loads((folder / LEGACY_META).read_text())
        if meta.get("format_version") != 1:
            raise QVLMError(f"{folder} has format version {meta.get('format_version')}; this qvlm reads 1 and "
                            f"{FORMAT_VERSION}")
        return QVLMConfig.load(folder / "config.json"), meta["stage"], meta["qformer_spec"]
    pretrained = QVLMPretrainedConfig.from_pretrained(folder)
    if pretrained.qvlm_format_version > FORMAT_VERSION:
        raise QVLMError(f"{folder} was written by a newer qvlm (format {pretrained.qvlm_format_version}, this "
                        f"one reads up to {FORMAT_VERSION}): upgrade qvlm")
    return pretrained.to_qvlm_config(), pretrained.stage, pretrained.qformer_spec


def read_trainable(folder: Path) -> dict[str, torch.Tensor]:
    """A model folder's trainable weights as `qformer.` / `adapter.` / `lora.` keys (both formats)."""
    weights = load_file(folder / WEIGHTS_FILE)
    lora = folder / LORA_FOLDER / "adapter_model.safetensors"
    if lora.is_file():
        weights |= {f"lora.{k}": v for k, v in load_file(lora).items()}
    return weights

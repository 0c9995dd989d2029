"""Configuration: one dataclass per part, presets, JSON/YAML round-trip and `key=value` overrides.

A model reference (`name` fields) is a Hugging Face hub id, a local folder, or an offline-bundle name
(`bundle:<name>`, see `qvlm.bundle`). When `random_init` is set, the part is built with random weights
from that transformers config dict instead (the `tiny` preset; speed benchmarks at the `paper` sizes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message says which key and what is allowed."""


# Fields (by name, in any section) that take one of a few words: named in the error for a wrong value.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # not "no": YAML reads a bare no as false
CHOICES = {"mixed_precision": PRECISIONS, "precision": PRECISIONS, "itc_pooling": ("mean_cls", "max"),
           "text_pooling": ("cls", "mean"),
           "dtype": ("float32", "bfloat16", "float16"), "image_position": ("before", "after", "after_turn"),
           "optimizer": ("adam", "adamw"), "decay_scope": ("matrices", "all"),
           "schedule": ("constant", "warmup_cosine", "hf_cosine"), "features": ("auto", "cache", "online")}


@dataclass
class VisionConfig:
    name: str = "google/vit-base-patch16-224"
    # Input side in pixels; None keeps the backbone's own. ViT/DINOv2 interpolate position embeddings.
    image_size: int | None = None
    random_init: dict | None = None
    # The encoder's arithmetic: fp32 | bf16 | fp16 | auto (bf16 where the hardware has bf16 units).
    # fp32 by default: bf16 features are within ~1% but changed the demo's outcome (docs/BENCHMARKS.md).
    precision: str = "fp32"


@dataclass
class QFormerConfig:
    name: str = "distilbert-base-uncased"  # BERT-family encoder whose embeddings and layers are copied
    random_init: dict | None = None
    num_queries: int = 32
    cross_every: int = 2  # a cross-attention block after every `cross_every`-th layer
    separate_query_ffn: bool = False  # BLIP-2 gives queries their own feed-forward (copied from text's)
    embed_dim: int = 256  # ITC projection width
    itc_pooling: str = "mean_cls"  # "mean_cls" (article: mean of queries vs [CLS]) or "max" (BLIP-2)
    # The caption's ITC vector: its [CLS] token (BLIP-2) or the mean of its tokens, which is what a
    # sentence-transformers encoder (all-MiniLM-L6-v2) was trained to make meaningful.
    text_pooling: str = "cls"
    temperature: float = 0.07
    learn_temperature: bool = False
    max_text_len: int = 32
    dropout: float = 0.1  # attention and hidden dropout (BERT's 0.1); 0 for the tiny test models
    # Stage 2 (InstructBLIP): the user's text joins the queries' self-attention, so the queries extract
    # what the question asks about. A stage-2 setting: a stage-1 run trained either way can --init it.
    instruction_aware: bool = False


@dataclass
class LMConfig:
    name: str = "HuggingFaceTB/SmolLM-135M-Instruct"
    random_init: dict | None = None
    tokenizer: str | None = None  # defaults to `name`
    dtype: str = "float32"  # weights of the frozen LM: float32 | bfloat16 | float16
    adapter_hidden: int | None = None  # None: the LM width (article: Linear(Dq→Dlm)→ReLU→Linear(Dlm→Dlm))
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Where the Nq image embeddings go: "before" or "after" the text inside the user turn, or "after_turn":
    # after the user turn ends, before the assistant turn (the article's layout).
    image_position: str = "before"
    system_prompt: str | None = None  # None: no system turn (shorter sequences train faster)
    # Answer questions from the model's own description of the image: training puts the image's caption
    # in front of each question ("a blue triangle. is there a red shape?"), inference generates it first.
    # The LM then compares words, which it already can, instead of learning to compare image slots
    # (docs/training.md#describe-first).
    describe_first: bool = False
    # With describe_first: train on the description in front of each question too, as on a caption
    # (the model writes it at inference). Otherwise only the few caption samples teach it to see: the
    # question samples copy colour and shape from the words in front of them.
    learn_description: bool = True


@dataclass
class Stage1Config:
    # "auto": from the training set's size, about AUTO_EPOCH_SAMPLES samples seen (train/stages.py)
    epochs: int | str = 10
    batch_size: int = 8
    grad_accum: int = 1
    lr_pretrained: float = 1e-5  # copied text layers and embeddings
    lr_new: float = 1e-4  # queries, cross-attention, heads
    # "adamw" (decoupled decay) or "adam" (torch.optim.Adam: a weight_decay > 0 is an L2 term in the gradient)
    optimizer: str = "adamw"
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.05
    # Which tensors weight_decay reaches: "matrices" (≥ 2-D, less the query tokens, embedding tables and
    # the temperature) or "all" (every trainable tensor, as AdamW(model.parameters()) does).
    decay_scope: str = "matrices"
    # Learning rate over the steps: "constant"; "warmup_cosine" (linear warm-up from lr/(warmup+1), cosine
    # to 10% of the lr); "hf_cosine" (transformers' get_cosine_schedule_with_warmup: warm-up from 0, cosine to 0).
    schedule: str = "warmup_cosine"
    warmup_steps: int = 100
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # Wall seconds for the training steps: the first steps are timed and, if the plan would overrun,
    # fewer steps are trained over a redrawn schedule (train/budget.py). None: no limit.
    time_budget_s: float | None = None
    itc_weight: float = 1.0
    itm_weight: float = 0.0
    itg_weight: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; null or 0: no clipping
    mixed_precision: str = "auto"  # auto (bf16 on GPUs, on CPUs where measured faster) | fp32 | bf16 | fp16


@dataclass
class Stage2Config:
    epochs: int | str = 5  # as stage1.epochs
    batch_size: int = 8
    grad_accum: int = 4
    lr_qformer: float = 1e-4
    lr_adapter_lora: float = 5e-4
    train_qformer: bool = True
    optimizer: str = "adamw"  # as stage1.optimizer, ...
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    decay_scope: str = "matrices"
    schedule: str = "warmup_cosine"  # ... and stage1.schedule
    warmup_steps: int = 100
    max_steps: int | None = None
    time_budget_s: float | None = None  # as stage1.time_budget_s
    grad_clip: float | None = 1.0  # as stage1.grad_clip
    # An answer longer than this is cut (without its EOS). null: never cut (the article's code); "auto":
    # the length that keeps 99% of the training answers whole.
    max_answer_tokens: int | str | None = 48
    mixed_precision: str = "auto"  # as stage1.mixed_precision


@dataclass
class GenerationConfig:
    """Default decoding of a trained model for `qvlm caption/ask/eval/report`, the server and
    evaluation; their own flags and request fields override it."""

    max_new_tokens: int | None = None  # null: each command's own default (32 for captions, 16 for answers)
    temperature: float = 0.0  # 0: greedy; > 0 samples (the article: 0.7)
    top_p: float = 1.0  # nucleus sampling, when temperature > 0
    repetition_penalty: float = 1.0  # 1: none (the article: 1.2)
    num_beams: int = 1


@dataclass
class TrainConfig:
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    num_workers: int = 0
    group_by_length: bool = True  # stage 2: batches of similar length, less padding (logged as pad_fraction)
    compile: bool = False  # torch.compile the training forward (first steps pay the compile; docs/training.md)
    feature_cache: str | None = None  # folder for cached patch features; None: $QVLM_CACHE/features
    # "cache": encode every image once into the feature cache before training (refused when the disk is
    # too small); "online": encode each batch inside the step; "auto": the cache when it fits the free
    # disk with a 25% margin, else online (docs/data.md#feature-cache)
    features: str = "auto"
    # Read --data shard by shard instead of as a list (docs/data.md#streaming): needs stageN.max_steps
    stream: bool = False
    shuffle_buffer: int = 1000  # streaming: samples each reader holds to shuffle within
    max_bad_fraction: float = 0.05  # stop if more than this share of samples cannot be decoded
    # Keep the model with the best value of this validation metric in RUN/best (needs --val): "val_loss"
    # (lower is better, as any *loss), "val_r1" (stage 1), "val_vqa_accuracy", "val_caption_cider". None: off.
    keep_best: str | None = None


@dataclass
class QVLMConfig:
    preset: str = "paper"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QVLMConfig:
        return _from_dict(cls, data, prefix="")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml") else (
            json.dumps(self.to_dict(), indent=2) + "\n"
        )
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> QVLMConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid JSON/YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        if data.get("model_type") == "qvlm":  # a model folder's config.json (models/configuration.py)
            from qvlm.models.configuration import QVLMPretrainedConfig

            return QVLMPretrainedConfig.from_dict(data).to_qvlm_config()
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> QVLMConfig:
        """Apply `section.key=value` strings (values parsed as YAML: 1e-4, true, [a, b], null)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            *parents, leaf = key.strip().split(".")
            node = data
            for i, part in enumerate(parents):
                if not isinstance(node.get(part), dict):
                    sections = [k for k, v in node.items() if isinstance(v, dict)]
                    where = f" in {'.'.join(parents[:i])}" if i else ""
                    valid = f"; valid sections{where}: {', '.join(sections)}" if sections else ""
                    raise ConfigError(f"unknown config section {'.'.join(parents[: i + 1])!r} in {item!r}{valid}")
                node = node[part]
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        return QVLMConfig.from_dict(data)


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, prefix + name + ".")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Coerce ints to floats where a float is expected; reject values of the wrong kind."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{key} may not be null")
    if hint is float or text.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is bool or text.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif hint is int or text.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if value == "auto" and "str" in text:  # a number chosen from the data (train/stages.py)
            return value
    elif hint is str or text.startswith("str"):
        choices = CHOICES.get(key.rpartition(".")[2])
        if isinstance(value, str) and (not choices or value in choices):
            return value
    elif "list" in text:
        if isinstance(value, list):
            return value
    elif "dict" in text:
        if isinstance(value, dict):
            return value
    else:
        return value
    expected = getattr(hint, "__name__", text)
    if text.startswith("int | str"):
        expected = "an integer, auto or null" if "None" in text else "an integer or auto"
    choices = CHOICES.get(key.rpartition(".")[2])
    if choices:
        expected = "one of " + ", ".join(choices)
    hint_yaml = " (YAML reads a bare no/off/yes/on as false/true)" if isinstance(value, bool) else ""
    raise ConfigError(f"{key} expects {expected}, got {value!r}{hint_yaml}")


# ---------------------------------------------------------------------------------------------------
# Presets (docs/design.md#presets)

# Architecture of the `tiny` preset's random backbones: small enough that the whole test suite trains
# real models in seconds on a CPU.
TINY_VISION = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_TEXT = {"model_type": "bert", "vocab_size": 262, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
TINY_LM = {"model_type": "llama", "vocab_size": 262, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "tie_word_embeddings": True,
           "initializer_range": 0.3}  # large enough that frozen random logits can become confident


# The article's code (the reference) asks its LM this, in a system turn before the user's.
ARTICLE_SYSTEM_PROMPT = "Answer the user's question truthfully"


def _paper() -> QVLMConfig:
    """The article exactly, as its code trains and samples (docs/training.md#the-recipe tabulates it)."""
    return QVLMConfig(
        preset="paper",
        qformer=QFormerConfig(max_text_len=512),  # the reference truncates captions at DistilBERT's 512
        lm=LMConfig(dtype="bfloat16", image_position="after_turn", system_prompt=ARTICLE_SYSTEM_PROMPT),
        # torch.optim.Adam's defaults, constant lr, no clipping, no autocast
        stage1=Stage1Config(optimizer="adam", adam_betas=[0.9, 0.999], weight_decay=0.0, schedule="constant",
                            warmup_steps=0, grad_clip=None, mixed_precision="fp32"),
        # torch.optim.AdamW's defaults (decay 0.01 on every tensor), transformers' cosine to 0, bf16
        stage2=Stage2Config(adam_betas=[0.9, 0.999], weight_decay=0.01, decay_scope="all", schedule="hf_cosine",
                            max_answer_tokens=None, mixed_precision="bf16"),
        # the reference keeps its best model by validation loss, and shuffles batches (no length grouping)
        train=TrainConfig(keep_best="val_loss", group_by_length=False),
        generation=GenerationConfig(max_new_tokens=100, temperature=0.7, top_p=0.9, repetition_penalty=1.2),
    )


def _paper_plus() -> QVLMConfig:
    """The article's architecture, data sizes and prompt layout with our training and decoding choices:
    warm-up + cosine to 10%, AdamW with decay on matrices only, bf16 where it is faster, clipping in both
    stages, answers capped at 48 tokens, greedy decoding, and the best model kept by validation loss.
    (The article's layout, a system turn and the image after the user turn, reached a lower validation
    loss than ours in docs/BENCHMARKS.md#paper-vs-paper-plus; `offline` keeps the shorter one for speed.)"""
    return QVLMConfig(
        preset="paper-plus",
        lm=LMConfig(image_position="after_turn", system_prompt=ARTICLE_SYSTEM_PROMPT),
        stage2=Stage2Config(weight_decay=0.01),  # the article's AdamW decay, on matrices only
        train=TrainConfig(keep_best="val_loss"),
    )


def _offline() -> QVLMConfig:
    return QVLMConfig(
        preset="offline",
        vision=VisionConfig(name="bundle:dinov2-small", image_size=112),
        qformer=QFormerConfig(name="bundle:all-minilm-l6-v2", num_queries=8, separate_query_ffn=True,
                              itc_pooling="max", learn_temperature=True),
        lm=LMConfig(name="bundle:smollm2-135m-instruct", lora_r=16, lora_alpha=32, lora_dropout=0.0),
        stage1=Stage1Config(epochs=1, batch_size=64, lr_pretrained=5e-5, lr_new=5e-4, warmup_steps=20,
                            itg_weight=1.0),
        stage2=Stage2Config(epochs=1, batch_size=16, grad_accum=1, lr_adapter_lora=1e-3, warmup_steps=20,
                            max_answer_tokens=8),
    )


def _captions() -> QVLMConfig:
    """`offline` for a user's own image-caption pairs, a few thousand of them: 32 queries (on openclipart
    R@5 rose from 27.8 with 8 to 32.3 with 32), epochs chosen from the data's size and answers capped
    where 99% of the training captions end, each choice printed when training starts (docs/training.md)."""
    config = _offline()
    config.preset = "captions"
    config.qformer.num_queries = 32
    config.stage1.epochs = config.stage2.epochs = "auto"
    config.stage2.max_answer_tokens = "auto"
    return config


def _tiny() -> QVLMConfig:
    return QVLMConfig(
        preset="tiny",
        vision=VisionConfig(name="tiny-vit", random_init=dict(TINY_VISION)),
        qformer=QFormerConfig(name="tiny-bert", random_init=dict(TINY_TEXT), num_queries=4, embed_dim=16,
                              max_text_len=24, dropout=0.0),
        lm=LMConfig(name="tiny-llama", random_init=dict(TINY_LM), lora_r=4, lora_alpha=8, lora_dropout=0.0),
        # fp32: tiny models gain nothing from bf16, and tests compare runs to 1e-5
        stage1=Stage1Config(epochs=1, batch_size=8, lr_pretrained=1e-3, lr_new=1e-3, warmup_steps=0,
                            mixed_precision="fp32"),
        stage2=Stage2Config(epochs=1, batch_size=4, grad_accum=1, lr_qformer=1e-3, lr_adapter_lora=3e-3,
                            warmup_steps=0, max_answer_tokens=16, mixed_precision="fp32"),
        train=TrainConfig(log_every=1, eval_every=50, save_every=50),
    )


PRESETS = {"paper": _paper, "paper-plus": _paper_plus, "offline": _offline, "captions": _captions, "tiny": _tiny}


def get_preset(name: str) -> QVLMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()

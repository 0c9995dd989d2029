"""Tokenizers and deterministic random weights for models built from a config (`random_init`).

The `tiny` preset and the speed benchmarks at the `paper` sizes need no download: backbones come from a
transformers config dict, and text goes through a byte-level tokenizer (256 byte tokens + 6 specials)
that carries both the BERT specials ([CLS]/[SEP]/[PAD]) and a ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[PAD]", "[CLS]", "[SEP]"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def tiny_lm_tokenizer() -> PreTrainedTokenizerFast:
    """Causal-LM side: EOS == PAD == <|im_end|> (as SmolLM2), no BOS, ChatML chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(), eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """Q-Former side: `[CLS] text [SEP]`, padded with [PAD], like a BERT tokenizer."""
    backend = _byte_tokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", backend.token_to_id("[CLS]")),
                                                 ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", unk_token="<|endoftext|>")


def random_model(auto_cls, config_dict: dict, seed: int = 0, device: str | torch.device = "cpu"):
    """Build `auto_cls` from a config dict with weights drawn from a fixed seed (same in every process,
    so a feature cache keyed by the model name stays valid). `device="meta"` allocates nothing."""
    config_dict = dict(config_dict)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    if str(device) == "meta":
        with torch.device("meta"):
            return auto_cls.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_cls.from_config(config)

"""GGUF (llama.cpp) causal LM -> plain float32 transformers folder.

transformers reads GGUF itself (`gguf_file=`, needs the `gguf` package) and dequantises every tensor
to float while loading; what is left is to drop the `quantization_config` it records (otherwise the
saved folder claims to be GGUF-quantised and reloading it would look for the .gguf file) and to save
the model and its tokenizer (with the chat template) the standard way.
"""

from __future__ import annotations

from pathlib import Path

from qvlm.extras import missing_extra

CHAT_END = "<|im_end|>"


def convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except ImportError as e:
        raise missing_extra(e, f"reading {gguf_path.name}", extra="bundle") from e
    _set_special_tokens(model, tokenizer)
    _drop_quantization(model)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "infinite"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _set_special_tokens(model, tokenizer) -> None:
    """ChatML models end a turn with <|im_end|>: make it EOS and PAD so generation stops there."""
    if CHAT_END not in tokenizer.get_vocab():
        return  # not a ChatML model: keep whatever the GGUF declared
    tokenizer.eos_token = CHAT_END
    tokenizer.pad_token = CHAT_END
    end_id = tokenizer.convert_tokens_to_ids(CHAT_END)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = end_id
        cfg.pad_token_id = end_id


def _drop_quantization(model) -> None:
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    # The weights are plain float tensors now; nothing may treat the model as quantised on save.
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    model.config.name_or_path = ""

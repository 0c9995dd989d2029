"""`QVLM.word_query_attention`: which queries each generated word drew on (`qvlm report`'s word_attention.png)."""

import pytest
import torch
from PIL import Image

from qvlm.config import get_preset
from qvlm.errors import QVLMError
from qvlm.eval.report import plot_word_query_attention
from qvlm.models.vlm import QVLM

PROMPTS = ["describe the picture in a few words", "what?"]  # different lengths: the batch is left-padded


def _model(instruction_aware: bool = False) -> QVLM:
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.qformer.instruction_aware = instruction_aware
    return QVLM.build(config).eval()


@pytest.fixture(scope="module")
def model() -> QVLM:
    return _model()


def test_one_row_per_generated_word_each_a_split_of_the_image_attention(model, tiny_images):
    features = model.encode_images(tiny_images[:2])
    eos = {"max_new_tokens": 5, "forced_eos_token_id": model.tokenizer.eos_token_id}  # the 5th token is EOS
    completions = model.generate_text(features, PROMPTS, **eos)
    assert completions.stopped == [True, True]
    samples = model.word_query_attention(features, PROMPTS, **eos)
    for sample, generated in zip(samples, completions.completion_tokens, strict=True):
        t = generated - 1  # EOS gets no row: it is no word of the answer
        assert len(sample["tokens"]) == t and all(isinstance(piece, str) for piece in sample["tokens"])
        assert sample["queries"].shape == (t, model.qformer.num_queries) and sample["image_share"].shape == (t,)
        torch.testing.assert_close(sample["queries"].sum(-1), torch.ones(t), atol=1e-5, rtol=0)
        assert ((sample["image_share"] > 0) & (sample["image_share"] <= 1)).all()
    assert not torch.allclose(samples[0]["queries"], samples[1]["queries"])


def test_rows_are_the_attention_of_the_position_that_chose_the_word(model, tiny_images):
    features = model.encode_images(tiny_images[:1])
    sample = model.word_query_attention(features, PROMPTS[:1], max_new_tokens=1)
    # Computed by hand: the first word was chosen at the prompt's last position; mean over layers and heads.
    inputs = model.processor(text=PROMPTS[:1])
    embeds = model.embed_inputs(features, inputs["input_ids"], inputs["image_mask"])
    base = model.lm.get_base_model()
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], output_attentions=True)
    finally:
        base.set_attn_implementation("sdpa")
    last = torch.stack(out.attentions).mean((0, 2))[0, -1]  # [L]
    on_slots = last[inputs["image_mask"][0]]  # [Nq]
    torch.testing.assert_close(sample[0]["image_share"], on_slots.sum()[None])
    torch.testing.assert_close(sample[0]["queries"], (on_slots / on_slots.sum())[None])


@pytest.mark.parametrize("instruction_aware", [False, True])
def test_a_batch_gives_what_each_sample_gives_alone(instruction_aware, tiny_images):
    model = _model(instruction_aware)
    features = model.encode_images(tiny_images[:2])
    batched = model.word_query_attention(features, PROMPTS, max_new_tokens=6)
    for i, sample in enumerate(batched):
        alone = model.word_query_attention(features[i:i + 1], PROMPTS[i:i + 1], max_new_tokens=6)[0]
        assert alone["tokens"] == sample["tokens"]
        torch.testing.assert_close(alone["queries"], sample["queries"], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone["image_share"], sample["image_share"], atol=1e-6, rtol=0)


def test_the_lm_is_back_on_its_own_attention_afterwards(model, tiny_images):
    features = model.encode_images(tiny_images[:2])
    config = model.lm.get_base_model().config
    implementation = config._attn_implementation
    before = model.generate_text(features, PROMPTS, max_new_tokens=6)
    model.word_query_attention(features, PROMPTS, max_new_tokens=6)
    assert config._attn_implementation == implementation == "sdpa"
    assert model.generate_text(features, PROMPTS, max_new_tokens=6) == before


def test_stage1_models_have_no_words(tiny_images):
    stage1 = QVLM.build(get_preset("tiny"), stage=1)
    with pytest.raises(QVLMError, match="stage-1"):
        stage1.word_query_attention(stage1.encode_images(tiny_images[:1]), PROMPTS[:1])


def test_the_plot_writes_a_png_even_for_an_empty_answer(model, tiny_images, tmp_path):
    samples = model.word_query_attention(model.encode_images(tiny_images[:2]), PROMPTS, max_new_tokens=8)
    nq = model.qformer.num_queries
    samples.append({"tokens": [], "queries": torch.zeros(0, nq), "image_share": torch.zeros(0)})
    path = plot_word_query_attention(tiny_images[:3], samples, tmp_path / "report" / "word_attention.png")
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.height > 3 * 100  # a row per image
    with pytest.raises(ValueError, match="3 images but 2 samples"):
        plot_word_query_attention(tiny_images[:3], samples[:2], tmp_path / "bad.png")

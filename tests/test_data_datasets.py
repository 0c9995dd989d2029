"""Stage-1/2 datasets from cache or images, prompts, collators, length-grouped sampler."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image
from test_data_cache import FakeEncoder  # tests/ is on sys.path under pytest

from qvlm.data.cache import FeatureCache
from qvlm.data.collate import LengthGroupedBatchSampler, Stage1Collator, Stage2Collator
from qvlm.data.datasets import CaptionDataset, InstructionDataset
from qvlm.data.images import DataError
from qvlm.data.prompts import CAPTION_PROMPTS, sample_caption_prompt, vqa_prompt
from qvlm.data.records import load_records
from qvlm.models.objectives import positive_pairs, same_caption_matrix


@pytest.fixture
def records(tmp_path):
    (tmp_path / "i").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 100, 50, 50)).save(tmp_path / "i" / f"{i}.png")
    rows = [{"image": "i/0.png", "captions": ["a red circle", "A  Red circle "]},
            {"image": "i/1.png", "caption": "a blue square"},
            {"image": "i/2.png", "caption": "   "},
            {"image": "i/2.png", "question": "what  colour?", "answers": ["red", "blue", "red"],
             "answer_type": "color"},
            {"image": "i/missing.png", "caption": "gone"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_records(tmp_path / "d.jsonl")


def test_caption_dataset_from_cache_and_images(tmp_path, records):
    encoder = FakeEncoder()
    cache = FeatureCache(tmp_path / "c", encoder)
    cache.build(records, progress=False)
    calls = encoder.calls
    ds = CaptionDataset(records, cache=cache)
    assert len(ds) == 3  # 2 captions + 1; the empty caption, the VQA record and the missing image drop
    assert ds.skips.skipped == {"empty_caption": 1, "missing": 1}
    item = ds[0]
    assert item["features"].shape == (4, 3) and item["caption"] == "a red circle"
    assert encoder.calls == calls  # no encoding (nor decoding) when training from the cache
    from_images = CaptionDataset(records, encoder=encoder)
    assert from_images[2]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(DataError):
        ds.check(0.05)  # 2 of 5 bad


def test_instruction_dataset(tmp_path, records):
    ds = InstructionDataset(records, encoder=FakeEncoder(), seed=1)
    items = [ds[i] for i in range(len(ds))]
    vqa = [it for it in items if it["answer_type"] == "color"][0]
    assert vqa["prompt"] == "what colour?" and vqa["answer"] == "red"
    assert vqa["answers"] == ["red", "blue", "red"]
    caps = [it for it in items if it["answer_type"] is None]
    assert {c["answer"] for c in caps} == {"a red circle", "A Red circle", "a blue square"}
    assert all(c["prompt"] in CAPTION_PROMPTS for c in caps)
    again = InstructionDataset(records, encoder=FakeEncoder(), seed=1)
    assert [again.prompt(i) for i in range(len(again))] == [ds.prompt(i) for i in range(len(ds))]
    epochs = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        epochs.add(ds.prompt(0))
    assert len(epochs) > 1  # caption prompts are re-drawn each epoch
    # length estimates (≈ 4 characters a token): the question + answer; a caption + the prompts' mean
    prompt_chars = sum(map(len, CAPTION_PROMPTS)) / len(CAPTION_PROMPTS)
    expected = [int(len("what colour?") + len("red")) // 4 + 1 if it["answer_type"] == "color"
                else int(prompt_chars + len(it["answer"])) // 4 + 1 for it in items]
    assert ds.lengths() == expected


def test_prompts():
    rng = random.Random(0)
    assert {sample_caption_prompt(rng) for _ in range(200)} == set(CAPTION_PROMPTS)
    assert vqa_prompt("  what is  it? ") == "what is it?"


def test_same_caption_matrix_exact():
    m = same_caption_matrix(["A red  circle", "a blue square", " a red circle ", "a Blue Square", "x"])
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0],
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_stage1_collator_drops_bad_items():
    items = [{"features": torch.zeros(4, 3), "caption": c, "image_key": k}
             for c, k in [("a", "k1"), ("b", "k1"), ("A", "k2")]]
    batch = Stage1Collator()(items[:2] + [None] + items[2:])
    assert batch["features"].shape == (3, 4, 3) and batch["captions"] == ["a", "b", "A"]
    assert batch["image_keys"] == ["k1", "k1", "k2"]


def test_positive_pairs_are_same_caption_or_same_image():
    # "a"/"A" share a caption; "a"/"b" share image k1; "b"/"A" share neither
    assert positive_pairs(["a", "b", "A"], ["k1", "k1", "k2"]).tolist() == [
        [True, True, True], [True, True, False], [True, False, True]]


def fake_build(tokenizer, user_texts, answers, num_queries, image_position="before", system_prompt=None,
               max_answer_tokens=None, learned_chars=None):
    """Stand-in with the exact signature of sequences.build_stage2_batch (char-level, left-padded)."""
    rows = [[1] * num_queries + [ord(c) for c in u] + [ord(c) for c in a][:max_answer_tokens] + [2]
            for u, a in zip(user_texts, answers, strict=True)]
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "image_mask": ids == 1, "labels": ids}


def test_stage2_collator_with_stand_in():
    items = [{"features": torch.ones(4, 3), "prompt": "q?", "answer": "yes", "answers": ["yes"],
              "answer_type": "yes/no", "image_key": "k"},
             {"features": torch.ones(4, 3), "prompt": "Describe this image.", "answer": "a dog",
              "answers": ["a dog"], "answer_type": None, "image_key": "j"}]
    batch = Stage2Collator(None, num_queries=2, max_answer_tokens=8, build_batch=fake_build)(items + [None])
    assert batch["features"].shape == (2, 4, 3) and batch["input_ids"].shape[0] == 2
    assert batch["answers"] == ["yes", "a dog"] and batch["answer_types"] == ["yes/no", None]
    assert batch["attention_mask"][0, 0] == 0  # left padding


def test_stage2_collator_real_sequences():
    sequences = pytest.importorskip("qvlm.models.processing")
    if not hasattr(sequences, "build_stage2_batch"):
        pytest.skip("sequences.build_stage2_batch not written yet")
    tok = _tiny_chat_tokenizer()
    items = [{"features": torch.ones(4, 3), "prompt": "q?", "answer": "yes", "image_key": "k"},
             {"features": torch.ones(4, 3), "prompt": "longer question here?", "answer": "no", "image_key": "j"}]
    batch = Stage2Collator(tok, num_queries=3)(items)
    assert batch["image_mask"].sum(1).tolist() == [3, 3]
    labelled = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert labelled[0] == tok("yes", add_special_tokens=False).input_ids + [tok.eos_token_id]


def _tiny_chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in "q? longer question here? yes no user assistant : \n <image>".split(" ") + list("abcdefghijklmnopqrstuvwxyz?:"):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    return tok


def test_length_grouped_sampler():
    lengths = [random.Random(i).randint(1, 100) for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, mega_batch_mult=10, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and len(sampler) == len(batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15  # grouped: far below random batches (~75)
    assert list(LengthGroupedBatchSampler(lengths, 8, 10, seed=3)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_length_grouped_sampler_splits_global_batches_across_ranks_and_skips():
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    whole = list(LengthGroupedBatchSampler(lengths, 8, 10, seed=5, drop_last=True))  # global batch 8
    ranks = [LengthGroupedBatchSampler(lengths, 4, 10, seed=5, rank=r, world_size=2) for r in (0, 1)]
    per_rank = [list(s) for s in ranks]
    assert [a + b for a, b in zip(*per_rank, strict=True)] == whole  # same data per step as one process
    seen = [i for b in per_rank[0] + per_rank[1] for i in b]
    assert len(seen) == len(set(seen)) == 96  # each sample at most once; the 7 left over are dropped
    ranks[0].skip = 3
    assert list(ranks[0]) == per_rank[0][3:] and len(ranks[0]) == len(per_rank[0]) - 3



@pytest.mark.parametrize("learn", [True, False])
def test_stage2_collator_trains_on_descriptions_only_when_asked(learn):
    seen = {}

    def recording_build(*args, learned_chars=None, **kwargs):
        seen["learned_chars"] = learned_chars
        return fake_build(*args, **kwargs)

    items = [{"features": torch.ones(4, 3), "prompt": "a red circle. is it red?", "description": "a red circle",
              "answer": "yes", "image_key": "k"},
             {"features": torch.ones(4, 3), "prompt": "Describe this image.", "description": None,
              "answer": "a red circle", "image_key": "k"}]
    Stage2Collator(None, num_queries=2, build_batch=recording_build, learn_description=learn)(items)
    assert seen["learned_chars"] == ([len("a red circle.")] if learn else [0]) + [0]

def test_describe_first_puts_the_image_caption_before_its_questions(tmp_path):
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 50, 50)).save(tmp_path / f"{i}.png")
    rows = [{"image": "0.png", "question": "is it  red?", "answer": "yes"},  # before its image's caption
            {"image": "0.png", "captions": ["a red circle.", "a round red thing"]},
            {"image": "1.png", "question": "is it blue?", "answer": "no"}]  # an image without a caption
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(tmp_path / "d.jsonl")
    ds = InstructionDataset(records, encoder=FakeEncoder(), describe_first=True)
    items = [ds[i] for i in range(len(ds))]
    by_question = {it["user_text"]: it["prompt"] for it in items if it["answer_type"] is None and
                   it["answer"] in ("yes", "no")}
    assert by_question == {"is it red?": "a red circle. is it red?", "is it blue?": "is it blue?"}
    assert ds.undescribed == 1
    captions = [it for it in items if it["answer"] not in ("yes", "no")]
    assert all(c["prompt"] == c["user_text"] and c["prompt"] in CAPTION_PROMPTS for c in captions)
    plain = InstructionDataset(records, encoder=FakeEncoder())
    assert [plain[i]["prompt"] for i in range(len(plain))] == [it["user_text"] for it in items]
    assert plain.undescribed == 0
    assert ds.lengths()[0] > plain.lengths()[0]  # the description is counted for length grouping
    assert vqa_prompt(" is it red? ", "a red circle. ") == "a red circle. is it red?"

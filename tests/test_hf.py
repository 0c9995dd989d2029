"""The transformers-native surface: Auto classes, the processor, the PEFT adapter folder, generation
arguments, `qvlm export` / `qvlm push` and the model card, on a tiny run trained through the CLI."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_shapes_dataset
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

import qvlm
from qvlm.cli.main import main
from qvlm.config import QVLMConfig, get_preset
from qvlm.errors import QVLMError
from qvlm.models.processing import build_stage2_batch, completion_lengths
from qvlm.models.vlm import QVLM

PROMPTS = ["Describe this image.", "What colour is the shape here?"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny stage-2 run trained for a few steps by `qvlm train` (so it has metrics.jsonl)."""
    root = tmp_path_factory.mktemp("hf")
    train, _ = write_shapes_dataset(root / "data", n_train=8, n_val=0)
    out = root / "run"
    assert main(["train", "stage2", "--preset", "tiny", "--data", str(train), "--out", str(out),
                 "--set", "stage2.max_steps=4", "--set", "train.save_every=100"]) == 0
    return out


@pytest.fixture(scope="module")
def model(run) -> QVLM:
    return QVLM.from_pretrained(run)


def test_config_round_trips_and_config_json_names_the_model_type(run):
    folder = run / "model"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "qvlm" and saved["architectures"] == ["QVLMForConditionalGeneration"]
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, qvlm.QVLMPretrainedConfig)
    ours = QVLMConfig.load(run / "config.json")  # the run's own config.json: the same transformers config
    assert config.to_qvlm_config() == ours
    from_run = AutoConfig.from_pretrained(run)
    assert (from_run.to_qvlm_config(), from_run.stage, from_run.qformer_spec) == (ours, 2, config.qformer_spec)
    assert QVLMConfig.load(folder / "config.json") == ours  # --config accepts a model folder's config.json
    assert config.lora_config["r"] == ours.lm.lora_r and config.lm_config["name"] == ours.lm.name


@pytest.mark.parametrize("where", ["run", "model folder"])
def test_auto_classes_give_the_same_model_as_qvlm(run, model, tiny_images, where):
    folder = run if where == "run" else run / "model"
    hf = AutoModelForImageTextToText.from_pretrained(folder)
    assert isinstance(hf, qvlm.QVLMForConditionalGeneration)
    assert isinstance(AutoModel.from_pretrained(folder), qvlm.QVLMForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, qvlm.QVLMProcessor)
    inputs = processor(images=tiny_images[:2], text=PROMPTS)
    ours = model.processor(images=tiny_images[:2], text=PROMPTS)
    assert inputs.keys() == ours.keys()
    for key in inputs:
        torch.testing.assert_close(inputs[key], ours[key])
    with torch.no_grad():
        logits = hf(**inputs).logits
        expected = model(model.encode_images(tiny_images[:2]), **build_stage2_batch(
            model.tokenizer, PROMPTS, None, model.qformer.num_queries), all_logits=True).logits
    torch.testing.assert_close(logits, expected)
    generated = hf.generate(**inputs, max_new_tokens=6)
    assert processor.batch_decode(generated, skip_special_tokens=True) == \
        model.generate_from_features(model.encode_images(tiny_images[:2]), PROMPTS, max_new_tokens=6)


def test_processor_renders_the_prompt_expands_the_image_slot_and_left_pads(model, tiny_images):
    inputs = model.processor(images=tiny_images[:2], text=["hi", "a much longer question about it"])
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # the short row is padded on the left
    assert inputs["image_mask"].sum(-1).tolist() == [model.qformer.num_queries] * 2
    torch.testing.assert_close(inputs["pixel_values"], model.vision.preprocess(tiny_images[:2]))
    text = model.tokenizer.decode(inputs["input_ids"][1][mask[1].bool()])
    assert "<|im_start|>user" in text and "a much longer question about it" in text
    one_question = model.processor(images=tiny_images[:3], text="what is it?")
    assert one_question["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        model.processor(images=tiny_images[:3], text=["a", "b"])


def test_peft_adapter_folder_reproduces_the_lora_logits(run, model):
    folder = run / "model"
    adapter = json.loads((folder / "lora" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == model.config.lm.lora_r
    from peft import PeftModel

    ids = model.tokenizer(["a red circle", "two blue squares"], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(folder / "lm")
    with torch.no_grad():
        plain = base(**ids).logits
        expected = model.lm(**ids).logits
        got = PeftModel.from_pretrained(base, folder / "lora")(**ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(plain, expected, atol=1e-4)  # the trained LoRA changes the logits


def test_generate_passes_every_generation_argument(model, tiny_images):
    features = model.encode_images(tiny_images[:2])
    inputs = model.processor(text=PROMPTS)
    beams = model.generate(**inputs, image_features=features, num_beams=2, num_return_sequences=2,
                           max_new_tokens=5)
    assert beams.shape[0] == 4
    done = model.generate_text(features, PROMPTS, num_beams=2, num_return_sequences=2, max_new_tokens=5)
    assert len(done.texts) == 4 and done.prompt_tokens[0] == done.prompt_tokens[1]
    # top_k=1 sampling is greedy: proves do_sample and top_k reach transformers
    greedy = model.generate(**inputs, image_features=features, max_new_tokens=5)
    torch.testing.assert_close(model.generate(**inputs, image_features=features, max_new_tokens=5,
                                              do_sample=True, top_k=1), greedy)
    exact = model.generate_text(features, PROMPTS, min_new_tokens=7, max_new_tokens=7)
    assert exact.completion_tokens == [7, 7] and exact.stopped == [False, False]

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3, dtype=torch.bool)

    stopped = model.generate(**inputs, image_features=features, min_new_tokens=20, max_new_tokens=20,
                             stopping_criteria=StoppingCriteriaList([AfterThree()]))
    assert stopped.shape[1] == 3
    streamer = TextIteratorStreamer(model.tokenizer, skip_special_tokens=True)
    with pytest.raises(ValueError, match="(?i)beam"):  # transformers' own rule, reached through ours
        model.generate(**model.processor(text=PROMPTS[:1]), image_features=features[:1], num_beams=2,
                       streamer=streamer)
    one = model.processor(text=PROMPTS[:1])
    no_repeat = model.generate(**one, image_features=features[:1], min_new_tokens=12, max_new_tokens=12,
                               no_repeat_ngram_size=1)
    assert len(set(no_repeat[0].tolist())) == 12  # no token twice


def test_completion_lengths_count_up_to_eos():
    ids = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert completion_lengths(ids, eos_token_id=2) == ([3, 4, 1], [True, False, True])


def test_export_merged_lora_loads_with_automodelforcausallm_alone(run, model, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_lm")
    assert type(merged).__module__.startswith("transformers.models.llama")
    ids = model.tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model.lm(**ids).logits, atol=1e-5, rtol=1e-4)
    again = QVLM.from_pretrained(out)
    torch.testing.assert_close(again.qformer.query_tokens, model.qformer.query_tokens)
    assert main(["export", str(run), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_model_card_holds_the_runs_measured_metrics(run):
    card = (run / "model" / "README.md").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert f"| stage2 | loss | {last['loss']:g} |" in card
    assert "qvlm train stage2 --preset tiny" in card  # the command that trained it
    assert "## Limitations" in card and "base_model" not in card  # random backbones: no hub ids to name


def test_earlier_format_loads_and_exports(model, tmp_path, tiny_images):
    """A folder as the previous qvlm wrote it (qvlm.json, our config.json, LoRA in model.safetensors)."""
    old = tmp_path / "old"
    model.save_pretrained(tmp_path / "new")
    (tmp_path / "new").rename(old)
    weights = load_file(old / "model.safetensors")
    weights |= {f"lora.{k}": v for k, v in load_file(old / "lora" / "adapter_model.safetensors").items()}
    save_file(weights, old / "model.safetensors")
    model.config.save(old / "config.json")
    (old / "qvlm.json").write_text(json.dumps({"format_version": 1, "stage": 2,
                                               "qformer_spec": vars(model.qformer.spec)}))
    model.tokenizer.save_pretrained(old / "tokenizer")
    shutil.rmtree(old / "lora")
    for leftover in ("generation_config.json", "processor_config.json"):
        (old / leftover).unlink()
    loaded = QVLM.from_pretrained(old)
    features = model.encode_images(tiny_images[:2])
    assert loaded.generate_from_features(features, PROMPTS, max_new_tokens=5) == \
        model.generate_from_features(features, PROMPTS, max_new_tokens=5)
    assert main(["export", str(old), "--out", str(tmp_path / "converted")]) == 0
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "qvlm"
    (old / "qvlm.json").write_text(json.dumps({"format_version": 7, "stage": 2}))
    with pytest.raises(QVLMError, match="format version 7"):
        QVLM.from_pretrained(old)


def test_retrieval_model_and_stage_checks(tmp_path, tiny_images):
    torch.manual_seed(0)
    stage1 = QVLM.build(get_preset("tiny"), stage=1).eval()
    stage1.save_pretrained(tmp_path / "s1")
    retrieval = qvlm.QVLMForImageTextRetrieval.from_pretrained(tmp_path / "s1")
    tokens = stage1.text_tokenizer(["a red circle", "a blue square"], return_tensors="pt", padding=True)
    pixels = stage1.vision.preprocess(tiny_images[:2])
    with torch.no_grad():
        similarity = retrieval(pixels, tokens.input_ids, tokens.attention_mask, use_itm_head=False).similarity
        expected = stage1.qformer.similarity(stage1.qformer.image_embeds(stage1.encode_images(tiny_images[:2])),
                                             stage1.qformer.text_embeds(tokens.input_ids, tokens.attention_mask))
        itm = retrieval(pixels, tokens.input_ids, tokens.attention_mask).itm_score
    torch.testing.assert_close(similarity, expected)
    assert itm.shape == (2,) and ((itm >= 0) & (itm <= 1)).all()
    with pytest.raises(QVLMError, match="stage-1 model"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "s1")


def test_push_uploads_the_export_and_fails_clearly_offline(run, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    uploaded = {}

    def upload_folder(self, folder_path, repo_id, **kwargs):  # the network call, mocked
        uploaded[repo_id] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(run), "--repo", "me/tiny-qvlm"]) == 0
    assert {"config.json", "README.md", "model.safetensors", "lora/adapter_config.json",
            "generation_config.json"} <= set(uploaded["me/tiny-qvlm"])

    def offline(self, repo_id, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["push", str(run), "--repo", "me/tiny-qvlm"]) == 1
    err = capsys.readouterr().err
    assert "could not push" in err and "offline" in err and "qvlm export" in err


def test_models_package_imports_nothing_from_data_train_eval_serve():
    forbidden = ("qvlm.data", "qvlm.train", "qvlm.eval", "qvlm.serve")
    for path in (Path(qvlm.__file__).parent / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not [n for n in names if n.startswith(forbidden)], f"{path.name} imports {names}"

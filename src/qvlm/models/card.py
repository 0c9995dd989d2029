"""The model card (README.md) of a model folder: what it is built from, how it was trained, what the run
measured, what it cannot do. Metrics are read from the run folder (metrics.jsonl, demo.json), never
written by hand; a folder saved outside a run says it has none.
"""

from __future__ import annotations

import json
from pathlib import Path

COMMAND_FILE = "command.txt"  # the `qvlm train ...` line of a run, written by the CLI


def write_model_card(folder: Path, model, run_dir: Path | None) -> None:
    """Write `folder/README.md` for `model` (a QVLM), with the measured metrics of `run_dir` if given."""
    config = model.config
    parts = [("vision encoder (frozen)", config.vision), ("Q-Former text encoder", config.qformer)]
    if model.stage == 2:
        parts.append(("language model (frozen, LoRA-tuned)", config.lm))
    hub_ids = [cfg.name for _, cfg in parts if cfg.random_init is None and "/" in cfg.name
               and not cfg.name.startswith("bundle:") and not Path(cfg.name).exists()]
    lines = ["---", "library_name: transformers", "pipeline_tag: " +
             ("image-text-to-text" if model.stage == 2 else "zero-shot-image-classification"),
             "tags: [qvlm, blip-2, vision-language]"]
    lines += ["base_model:", *[f"- {name}" for name in hub_ids]] if hub_ids else []
    lines += ["---", "", f"# qvlm stage-{model.stage} model", "",
              "A BLIP-2-style vision-language model built with qvlm: a frozen image encoder, a Q-Former "
              "whose queries read the image, " + ("an adapter into a LoRA-tuned causal LM." if model.stage == 2
                                                   else "and its retrieval heads (no language model)."), "",
              "## Base models", ""]
    lines += [f"- {role}: `{_describe(cfg)}`" for role, cfg in parts]
    lines += ["", "## Training", "", *_training(config, model.stage, run_dir), "", "## Metrics", "",
              *_metrics(run_dir), "", "## Use", "", *_usage(model.stage), "", "## Limitations", "",
              *_limitations(config), ""]
    (folder / "README.md").write_text("\n".join(lines))


def _describe(cfg) -> str:
    return f"random weights ({cfg.random_init.get('model_type')}, for tests)" if cfg.random_init else cfg.name


def _training(config, stage: int, run_dir: Path | None) -> list[str]:
    settings = config.stage1 if stage == 1 else config.stage2
    lines = [f"Preset `{config.preset}`, stage {stage}: {settings.epochs} epoch(s), batch {settings.batch_size}"
             + (f", at most {settings.max_steps} steps" if settings.max_steps else "") + ". The full "
             "configuration is in config.json (`training_config`)."]
    command = run_dir / COMMAND_FILE if run_dir is not None else None
    if command is not None and command.is_file():
        lines += ["", "Command:", "", "```", command.read_text().strip(), "```"]
    elif run_dir is not None and (run_dir / "demo.json").is_file():
        lines += ["", "Trained by `qvlm demo` (easy-VQA shapes and colours)."]
    else:
        lines += ["", "The training command was not recorded."]
    return lines


def _metrics(run_dir: Path | None) -> list[str]:
    """The last value of every number the run logged, per stage, and the demo's test scores."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return ["No metrics: this folder was not saved from a training run."]
    latest: dict[str, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict):
            stage = latest.setdefault(str(record.get("stage", "?")), {})
            stage.update({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"})
    lines = [f"From `{run_dir.name}/metrics.jsonl` (the last logged value of each):", "",
             "| stage | metric | value |", "|---|---|---:|"]
    lines += [f"| {stage} | {key} | {value:g} |" for stage, values in latest.items() for key, value in values.items()]
    demo = run_dir / "demo.json"
    if demo.is_file():
        summary = json.loads(demo.read_text())
        vqa, retrieval = summary.get("vqa", {}), summary.get("retrieval", {})
        lines += ["", "Test split (`demo.json`):", "", "| metric | value |", "|---|---:|"]
        if "exact_match" in vqa:
            lines.append(f"| VQA exact match ({vqa.get('n')} questions) | {vqa['exact_match']:.4f} |")
        lines += [f"| retrieval {key} | {value:.4f} |" for key, value in retrieval.items() if key != "n_images"]
    return lines


def _usage(stage: int) -> list[str]:
    if stage == 1:
        return ["```python", "import qvlm", "", 'model = qvlm.QVLMForImageTextRetrieval.from_pretrained("PATH")',
                "```"]
    return ["```python", "import qvlm  # registers the qvlm classes with the transformers Auto classes",
            "from PIL import Image", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
            'model = AutoModelForImageTextToText.from_pretrained("PATH")',
            'processor = AutoProcessor.from_pretrained("PATH")',
            'inputs = processor(images=Image.open("photo.jpg"), text="Describe this image.")',
            "print(processor.batch_decode(model.generate(**inputs), skip_special_tokens=True))", "```", "",
            "The LoRA alone is a PEFT adapter in `lora/`: "
            "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_LM), \"PATH/lora\")`."]


def _limitations(config) -> list[str]:
    size = f"{config.vision.image_size} px" if config.vision.image_size else "the encoder's input size"
    return [f"- Images are read at {size}, through {config.qformer.num_queries} query tokens: small details "
            "are lost.",
            "- Trained on the run's data only; expect confident but wrong answers outside it.",
            "- One image per prompt; English prompts.",
            "- Loading needs `import qvlm` (custom architecture: no `trust_remote_code` code is shipped)."]

"""The `paper` preset is the article (issue 16): docs/training.md's recipe table is checked against the
presets, and the article's optimisers, schedules, prompt layout and decoding defaults do what they say."""

import re
from pathlib import Path

import pytest
import torch

from qvlm.cli.infer import generation_kwargs, with_run_defaults
from qvlm.cli.main import build_parser
from qvlm.config import ConfigError, get_preset
from qvlm.errors import QVLMError
from qvlm.models.processing import IMAGE_MARKER, USER_MARKER, render_prompt
from qvlm.models.tiny import tiny_lm_tokenizer
from qvlm.models.vlm import QVLM
from qvlm.train.optim import build_optimizer, build_schedule, stage1_param_groups, stage2_param_groups

TRAINING_MD = Path(__file__).parents[1] / "docs" / "training.md"
PRESET_COLUMNS = ("paper", "paper-plus", "offline")


def _recipe_table() -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table under docs/training.md's "The recipe" heading."""
    text = TRAINING_MD.read_text()
    section = text[text.index("## The recipe"):]
    lines = [line for line in section.splitlines()[1:] if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], [row for row in cells[2:]]  # cells[1] is the |---| line


def _field(config, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _keyed_rows() -> list[tuple[str, dict[str, str]]]:
    header, rows = _recipe_table()
    out = []
    for row in rows:
        keys = re.findall(r"`([a-z0-9_]+\.[a-z0-9_.]+)`", row[1])
        out += [(key, dict(zip(header, row, strict=True))) for key in keys]
    return out


def test_the_recipe_table_has_a_column_per_preset_and_a_row_per_config_setting():
    header, rows = _recipe_table()
    assert header[:3] == ["setting", "config", "article (reference code)"]
    assert [h.strip("`") for h in header[3:]] == list(PRESET_COLUMNS)
    keys = {key for key, _ in _keyed_rows()}
    # every training hyper-parameter of both stages, and the decoding defaults, have a row
    for section in ("stage1", "stage2", "generation"):
        fields = set(vars(_field(get_preset("paper"), section)))
        fields -= {"max_steps", "time_budget_s"}  # run lengths, not the recipe
        assert {f"{section}.{f}" for f in fields} <= keys, sorted({f"{section}.{f}" for f in fields} - keys)
    assert len(rows) > len(keys) // 2  # descriptive rows (masks, objectives, layout) are there too


@pytest.mark.parametrize("preset", PRESET_COLUMNS)
def test_each_preset_resolves_to_the_values_in_the_recipe_table(preset):
    """A table cell holds the value in backticks, written as `--set` takes it; the config must hold the
    same value. Change a preset or the table alone and this fails."""
    config = get_preset(preset)
    for key, row in _keyed_rows():
        cell = row[f"`{preset}`"]
        value = re.match(r"`([^`]*)`", cell)
        assert value, f"{preset} cell of {key} must start with the value in backticks, got {cell!r}"
        expected = _field(config.override([f"{key}={value.group(1)}"]), key)
        assert _field(config, key) == expected, f"{preset}: {key} is {_field(config, key)!r}, the table says {cell}"


def test_paper_optimisers_are_the_references_adam_and_adamw_with_their_defaults():
    paper = get_preset("paper")
    config = get_preset("tiny")
    config.stage1, config.stage2 = paper.stage1, paper.stage2  # the paper's recipe on the tiny model
    model = QVLM.build(config, stage=2)
    stage1 = build_optimizer(stage1_param_groups(model, config), config.stage1)
    assert type(stage1) is torch.optim.Adam
    assert {(g["betas"], g["weight_decay"]) for g in stage1.param_groups} == {((0.9, 0.999), 0.0)}
    stage2 = build_optimizer(stage2_param_groups(model, config), config.stage2)
    assert type(stage2) is torch.optim.AdamW
    # AdamW(params)'s default decay reaches every tensor, biases and norms included
    assert {(g["betas"], g["weight_decay"]) for g in stage2.param_groups} == {((0.9, 0.999), 0.01)}
    assert not any(g["name"].endswith("no_decay") for g in stage2.param_groups)
    config.stage2 = get_preset("paper-plus").stage2
    plus = build_optimizer(stage2_param_groups(model, config), config.stage2)
    assert {g["weight_decay"] for g in plus.param_groups} == {0.0, 0.01}  # matrices decay, the rest not


def _lrs(stage_cfg, total_steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_schedule(optimizer, stage_cfg, total_steps)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs  # the lr of steps 0 .. total_steps


def test_paper_schedules_constant_then_warmup_from_zero_and_cosine_to_zero():
    paper, plus = get_preset("paper"), get_preset("paper-plus")
    assert set(_lrs(paper.stage1, 50)) == {1.0}
    lrs = _lrs(paper.stage2, 1000)
    assert lrs[0] == 0.0 and lrs[50] == pytest.approx(0.5) and lrs[100] == pytest.approx(1.0)  # 100 warm-up
    assert lrs[550] == pytest.approx(0.5) and lrs[1000] == pytest.approx(0.0)
    ours = _lrs(plus.stage2, 1000)
    assert ours[0] == pytest.approx(1 / 101) and ours[1000] == pytest.approx(0.1)  # never 0


def test_unknown_optimizer_or_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="stage2.schedule expects one of constant, warmup_cosine, hf_cosine"):
        get_preset("tiny").override(["stage2.schedule=cosine"])
    with pytest.raises(ConfigError, match="stage1.optimizer expects one of adam, adamw"):
        get_preset("tiny").override(["stage1.optimizer=sgd"])
    with pytest.raises(ConfigError, match="adam_betas"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}],
                        get_preset("tiny").override(["stage1.adam_betas=[0.9]"]).stage1)


def test_after_turn_puts_the_image_between_the_user_turn_and_the_assistant_turn():
    tok = tiny_lm_tokenizer()
    system = get_preset("paper").lm.system_prompt
    prompt = render_prompt(tok, "after_turn", system)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": USER_MARKER}]
    turns = tok.apply_chat_template(messages, tokenize=False)  # system turn, then user turn, closed
    opening = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)[len(turns):]
    assert prompt == turns + IMAGE_MARKER + opening and opening.strip()
    inside = render_prompt(tok, "before", None)
    assert inside.index(IMAGE_MARKER) < inside.index(USER_MARKER) and system not in inside


def _flags(argv: list[str]) -> dict:
    return generation_kwargs(build_parser().parse_args(argv))


def test_decoding_follows_the_runs_generation_config_and_the_flags_override_it():
    paper, tiny = get_preset("paper").generation, get_preset("tiny").generation
    sampled = with_run_defaults(_flags(["caption", "RUN", "x.png"]), paper, 32)
    assert sampled == {"max_new_tokens": 100, "num_beams": 1, "temperature": 0.7, "top_p": 0.9,
                       "repetition_penalty": 1.2}
    greedy = with_run_defaults(_flags(["caption", "RUN", "x.png", "--greedy"]), paper, 32)
    assert greedy["temperature"] == 0.0 and greedy["max_new_tokens"] == 100
    flagged = with_run_defaults(_flags(["ask", "RUN", "x.png", "what?", "--temperature", "0.3",
                                        "--max-new-tokens", "5"]), paper, 16)
    assert flagged["temperature"] == 0.3 and flagged["max_new_tokens"] == 5 and flagged["top_p"] == 0.9
    # presets without decoding settings: greedy, and each command's own length
    assert with_run_defaults({}, tiny, 16) == {"max_new_tokens": 16, "num_beams": 1, "temperature": 0.0,
                                               "top_p": 1.0, "repetition_penalty": 1.0}
    with pytest.raises(QVLMError, match="--temperature must be >= 0"):
        _flags(["caption", "RUN", "x.png", "--temperature", "-1"])
    with pytest.raises(QVLMError, match="generation.top_p in"):
        with_run_defaults({}, get_preset("tiny").override(["generation.top_p=0"]).generation, 32)

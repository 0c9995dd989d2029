"""Every `qvlm ...` line in README.md and docs/*.md runs as written (issue 21).

The lines are read from the documents' fenced code blocks. Each one either
- runs, in a folder laid out as the docs assume (tiny shapes data at the documented paths), with the
  `tiny` preset for `offline`/`paper` and at most 2 steps per training stage (`TINY`); or
- is a synopsis (placeholders like RUN, `[optional]`, `a|b`): every flag it shows must exist; or
- is in `NOT_RUN`, with the test that runs it instead: it must still parse.
A new documented line therefore cannot escape: it runs, or someone lists why not.
"""

import os
import re
import shlex
from pathlib import Path

import pytest
from helpers import shape_image, write_shape_shards, write_shapes_dataset
from serve_support import running_server

from qvlm.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands (as argv prefixes) that are not run here, and the test that runs them.
NOT_RUN = {
    ("fetch",): "downloads the 270 MB offline bundle: tests/test_bundle_real.py (bundle marker)",
    ("data", "easyvqa"): "copies easy-VQA's 5,000 images: tests/test_data_convert.py::test_easyvqa_command",
    ("bench",): "minutes at the paper sizes: tests/test_bench.py runs the same flags on the tiny preset",
    ("push",): "uploads to the Hugging Face Hub: tests/test_hf.py::test_push_uploads_the_export_and_fails_clearly_offline"
               " runs it with the network call mocked",
}
# What makes a documented line quick here: the tiny preset, two steps per stage.
TINY = ["--set", "stage1.max_steps=2", "--set", "stage2.max_steps=2"]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\.\.\.)?$")


def documented_commands(path: Path) -> list[str]:
    """The `qvlm` lines of the file's fenced code blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if re.match(r"^([A-Z_]+=\S+\s+)*qvlm\s", line.strip()):
                lines.append(line.strip())
    return lines


def split_line(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """`A=1 qvlm x && time qvlm y  # note` -> [({"A": "1"}, ["x"]), ({}, ["y"])]."""
    commands, tokens = [], shlex.split(line, comments=True)
    while tokens:
        end = tokens.index("&&") if "&&" in tokens else len(tokens)
        tokens, rest = tokens[:end], tokens[end + 1:]
        env = {}
        while "=" in tokens[0]:
            key, _, value = tokens.pop(0).partition("=")
            env[key] = value
        if tokens[0] == "time":
            tokens.pop(0)
        assert tokens[0] == "qvlm", line
        commands.append((env, tokens[1:]))
        tokens = rest
    return commands


def is_synopsis(argv: list[str]) -> bool:
    return any("[" in t or "]" in t or "|" in t or PLACEHOLDER.match(t) for t in argv)


def subparser(argv: list[str]):
    """The argparse parser of the (sub)command that argv names, and the words naming it."""
    parser, words = build_parser(), []
    for token in argv:
        choices = next((a.choices for a in parser._actions if a.choices and isinstance(a.choices, dict)), None)
        if not choices or token not in choices:
            break
        parser, words = choices[token], [*words, token]
    return parser, words


def check_flags(argv: list[str]) -> None:
    parser, words = subparser(argv)
    known = {s for a in parser._actions for s in a.option_strings}
    for token in argv:
        flag = re.match(r"^\[?(--[a-z][a-z0-9-]*)", token)
        if flag:
            assert flag.group(1) in known, f"qvlm {' '.join(words)} has no {flag.group(1)}"


def not_run_reason(argv: list[str]) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if tuple(argv[: len(prefix)]) == prefix), None)


def tiny(argv: list[str]) -> list[str]:
    """The documented command on the tiny preset: quick, and nothing to download."""
    argv = ["tiny" if a in ("offline", "paper", "captions") and argv[i - 1] == "--preset" and argv[0] != "info" else a
            for i, a in enumerate(argv)]
    return [*argv, *TINY] if argv[0] == "train" else argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding what the documents' commands refer to, as small as the tiny preset needs."""
    ws = tmp_path_factory.mktemp("docs")
    easy = ws / "data" / "easyvqa"
    write_shapes_dataset(easy, n_train=16, n_val=8)
    (easy / "test.jsonl").write_text((easy / "val.jsonl").read_text())
    shape_image("red", "circle", seed=1).save(ws / "photo.jpg")
    write_shape_shards(ws / "cc3m", records=332, shards=332)  # docs/data.md streams cc3m/{00000..00331}.tar
    (ws / "photos").mkdir()
    (ws / "my-photos").mkdir()
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"),
                                         ("yellow", "square")] * 3):
        shape_image(colour, shape, seed=i).save(ws / "photos" / f"{i}.png")
        name = "beach" if i == 0 else f"{i}"
        shape_image(colour, shape, seed=i).save(ws / "my-photos" / f"{name}.jpg")
        (ws / "my-photos" / f"{name}.txt").write_text(f"a {colour} {shape}\n")
    return ws


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("QVLM_CACHE", str(workspace / "qvlm-cache"))  # feature cache; nothing downloaded
    return workspace


def trained(ws: Path) -> Path:
    """runs/s1 and runs/s2 as the README's own train lines make them (once per module)."""
    if not (ws / "runs" / "s2" / "model").is_dir():
        for line in documented_commands(ROOT / "README.md"):
            (_, argv), = split_line(line)
            if argv[0] == "train":
                assert main(tiny(argv)) == 0, line
    return ws / "runs" / "s2"


def fake_uvicorn_run(calls: list):
    """Instead of serving forever: serve the app on a free port, check /health, return."""
    import httpx

    def run(app, host, port, **kwargs):
        with running_server(app) as url:
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        calls.append((host, port))

    return run


def run_documented(path: Path, monkeypatch) -> list[str]:
    """Run (or check) each qvlm line of `path`; return the lines run."""
    import uvicorn

    served: list = []
    monkeypatch.setattr(uvicorn, "run", fake_uvicorn_run(served))
    ran, serves = [], 0
    for line in documented_commands(path):
        for env, argv in split_line(line):
            if is_synopsis(argv):
                check_flags(argv)
                continue
            if not_run_reason(argv):
                build_parser().parse_args(argv)  # still a valid command line
                continue
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            assert main(tiny(argv)) == 0, f"{path.name}: {line}"
            ran.append(line)
            serves += argv[0] == "serve"
    assert len(served) == serves  # each served command answered /health
    return ran


def test_readme_commands_run_as_written(in_workspace, monkeypatch, capsys):
    ran = run_documented(ROOT / "README.md", monkeypatch)
    assert any("qvlm search runs/s1 --images photos/" in line for line in ran)
    assert (in_workspace / "vqa.json").is_file() and (in_workspace / "runs/s2/report/loss.png").is_file()
    hits = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("1  ")]
    assert hits, "search printed no ranking"


@pytest.mark.slow
def test_quickstart_commands_run_as_written(in_workspace, monkeypatch):
    demo = in_workspace / "qvlm-demo"
    (demo / "data" / "images" / "test").mkdir(parents=True, exist_ok=True)
    shape_image("blue", "square", seed=3).save(demo / "data" / "images" / "test" / "0.png")
    if not (demo / "run").exists():
        os.symlink(trained(in_workspace), demo / "run")  # what `qvlm demo` leaves there
    ran = run_documented(ROOT / "docs" / "quickstart.md", monkeypatch)
    assert any(line.startswith("qvlm serve runs/mine") for line in ran)
    assert (in_workspace / "runs" / "mine" / "model" / "lora" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_other_docs_commands_run_or_name_real_flags(in_workspace, monkeypatch):
    if not (in_workspace / "runs" / "my-run").exists():
        os.symlink(trained(in_workspace), in_workspace / "runs" / "my-run")
    for path in DOCS:
        if path.name not in ("README.md", "quickstart.md"):
            run_documented(path, monkeypatch)


def test_a_synopsis_with_a_flag_that_does_not_exist_is_caught():
    check_flags(["caption", "RUN", "IMAGE", "--json"])
    with pytest.raises(AssertionError, match="no --colour"):
        check_flags(["search", "RUN", "TEXT", "--images", "DIR", "[--colour", "red]"])

"""A newcomer's first hour (issue 21): extras named when missing, quiet output, errors that say the way out."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_shapes_dataset

from qvlm.cli.main import build_parser, main
from qvlm.config import PRECISIONS, ConfigError, get_preset
from qvlm.console import progress
from qvlm.errors import QVLMError
from qvlm.extras import EXTRA_OF, MissingExtra, missing_extra
from qvlm.models.configuration import QVLMPretrainedConfig

ROOT = Path(__file__).resolve().parents[1]
SERVE_PACKAGES = ("fastapi", "starlette", "uvicorn", "httpx")

# --- extras ---------------------------------------------------------------------------------------


def test_each_optional_package_is_in_the_extra_its_message_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {r.split(">")[0].split("=")[0].split("[")[0].replace("-", "_") for r in requirements}

    for package, extra in EXTRA_OF.items():
        if package != "starlette":  # comes with fastapi
            assert package in names(extras[extra]), (package, extra)
        assert package not in names(project["dependencies"]), f"{package} is optional, not a core dependency"
    assert "python_multipart" not in names(project["dependencies"]) | names(sum(extras.values(), []))
    assert "qvlm[all]" in extras["dev"]
    assert set(extras["all"][0].removeprefix("qvlm[").removesuffix("]").split(",")) == set(extras) - {"all", "dev"}


def test_missing_extra_names_the_pip_command_and_ignores_other_import_errors():
    error = missing_extra(ModuleNotFoundError("No module named 'pycocoevalcap'", name="pycocoevalcap.bleu"))
    assert isinstance(error, MissingExtra)
    assert "pip install 'qvlm[eval]'" in str(error)
    assert missing_extra(ModuleNotFoundError("nope", name="qvlm.train.trainer")) is None  # a bug, not an extra


def test_missing_easy_vqa_says_which_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # as if not installed
    assert main(["data", "easyvqa", "--out", str(tmp_path / "d")]) == 1
    assert "pip install 'qvlm[demo]'" in capsys.readouterr().err


def test_caption_eval_checks_its_extra_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    train, _ = write_shapes_dataset(tmp_path, n_train=2, n_val=0)
    assert main(["eval", str(tmp_path / "no-such-run"), "--data", str(train), "--task", "caption"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'qvlm[eval]'" in err and "no-such-run" not in err


def test_serve_on_a_plain_install_says_which_extra_to_add(tmp_path):
    """A fresh interpreter where the serve packages cannot be imported, as after `pip install qvlm`."""
    code = (f"import sys\nfor m in {SERVE_PACKAGES!r}: sys.modules[m] = None\n"
            "from qvlm.cli.main import build_parser, main\n"
            "assert 'serve' in build_parser().format_help()  # the CLI still starts and lists it\n"
            f"sys.exit(main(['serve', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "pip install 'qvlm[serve]'" in done.stderr and "Traceback" not in done.stderr


# --- console output -------------------------------------------------------------------------------


def test_progress_in_a_log_file_writes_whole_lines_with_rate_and_eta():
    log = io.StringIO()  # not a TTY
    with progress(total=3, desc="work", file=log, mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")
    assert len(lines) == len(set(lines)) >= 2  # one line per update, the closing repeat dropped
    assert "it/s" in lines[-1] or "s/it" in lines[-1]
    assert "<" in lines[1]  # elapsed<remaining: the ETA


def test_tiny_training_prints_qvlm_progress_and_no_library_noise(tmp_path, private_cache, capfd):
    train, val = write_shapes_dataset(tmp_path / "data", n_train=8, n_val=4)
    args = ["train", "stage1", "--preset", "tiny", "--data", str(train), "--val", str(val),
            "--set", "stage1.max_steps=1"]
    assert main([*args, "--out", str(tmp_path / "quiet")]) == 0
    out = capfd.readouterr()
    text = out.out + out.err
    for noise in ("Loading weights", "Writing model shards", "torchvision", "Warning", "[transformers]"):
        assert noise not in text, noise
    assert "\r" not in out.err  # captured output is a log: whole lines only
    assert "feature cache: 100%" in out.err and "stage 1: 100%" in out.err
    # --verbose lets the libraries speak (so the check above is not vacuous)
    assert main(["--verbose", *args, "--out", str(tmp_path / "verbose")]) == 0
    assert "Writing model shards" in capfd.readouterr().err


# --- errors that say the way out ------------------------------------------------------------------


def test_mixed_precision_no_lists_the_choices():
    with pytest.raises(ConfigError, match="one of " + ", ".join(PRECISIONS)) as e:
        get_preset("tiny").override(["stage1.mixed_precision=no"])
    assert "YAML" in str(e.value)


def test_unknown_config_section_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid sections: vision, qformer, lm, stage1, stage2, train"):
        get_preset("tiny").override(["stage3.epochs=1"])


def test_init_with_another_qformer_config_names_the_fields(tmp_path):
    from qvlm.train.stages import stage2_model

    init = tmp_path / "s1" / "model"
    init.mkdir(parents=True)
    (init / "model.safetensors").write_bytes(b"")  # never read: the config check comes first
    QVLMPretrainedConfig.from_qvlm_config(get_preset("tiny"), stage=1, qformer_spec={}).save_pretrained(init)
    config = get_preset("tiny").override(["qformer.num_queries=6", "qformer.embed_dim=24"])
    with pytest.raises(QVLMError) as e:
        stage2_model(config, tmp_path / "s1")
    message = str(e.value)
    assert "qformer.num_queries (--init: 4, here: 6)" in message
    assert "qformer.embed_dim (--init: 16, here: 24)" in message
    assert "vision." not in message and "--config" in message


def test_stage2_without_init_warns_loudly(tmp_path, monkeypatch, capsys):
    import qvlm.train.trainer

    monkeypatch.setattr(qvlm.train.trainer, "train", lambda *a, **k: tmp_path / "model")  # no training
    train, _ = write_shapes_dataset(tmp_path, n_train=2, n_val=0)
    base = ["train", "stage2", "--preset", "tiny", "--data", str(train), "--out", str(tmp_path / "run")]
    assert main(base) == 0
    assert "WARNING: stage 2 without --init" in capsys.readouterr().err
    (tmp_path / "s1").mkdir()
    assert main([*base, "--init", str(tmp_path / "s1")]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_hub_dataset_id_says_what_is_read_offline(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", "HuggingFaceM4/VQAv2", "--task", "vqa"]) == 1
    err = capsys.readouterr().err
    assert "Hugging Face hub id" in err and "save_to_disk" in err and "qvlm[datasets]" in err


def test_search_query_after_images_is_not_swallowed():
    args = build_parser().parse_args(["search", "runs/s1", "--images", "photos/", "a red circle"])
    assert (args.text, args.images) == ("a red circle", ["photos/"])
    args = build_parser().parse_args(["search", "r", "a b", "--images", "x", "--images", "y.png"])
    assert (args.text, args.images) == ("a b", ["x", "y.png"])


def test_constraints_pin_every_dependency_of_the_dev_install():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    for name in ("torch", "transformers", "peft", "accelerate", "fastapi", "pycocoevalcap", "gguf", "onnx",
                 "matplotlib", "easy-vqa", "datasets", "pytest"):
        assert name in pins, name
    assert "python-multipart" not in pins

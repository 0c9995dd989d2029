"""Training through the real CLI (issue 5): loss falls, resume is exact, NaN stops, safe files only."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import read_metrics, write_shapes_dataset
from safetensors.torch import load_file

from qvlm.cli.main import main

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest.py


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(root)


def _train(stage, data, val, out, *extra):
    args = ["train", stage, "--preset", "tiny", "--data", str(data), "--val", str(val), "--out", str(out)]
    return main(args + list(extra))


@pytest.fixture(scope="module")
def stage1_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "s1"
    os.environ.setdefault("QVLM_CACHE", str(out.parent / "cache"))
    assert _train("stage1", *shapes, out, "--set", "stage1.epochs=6", "--set", "train.eval_every=5",
                  "--set", "stage1.itg_weight=1.0", "--set", "stage1.itm_weight=1.0") == 0
    return out


def test_stage1_reduces_validation_loss(stage1_run):
    val = [m["val_loss"] for m in read_metrics(stage1_run) if "val_loss" in m]
    train = [m for m in read_metrics(stage1_run) if "itc" in m]
    assert {"itc", "itm", "itg"} <= set(train[-1])
    assert val[-1] < val[0]
    assert (stage1_run / "model" / "model.safetensors").is_file()


def test_stage2_reduces_validation_loss_and_writes_safe_files(shapes, stage1_run, tmp_path):
    out = tmp_path / "s2"
    assert _train("stage2", *shapes, out, "--init", str(stage1_run), "--set", "stage2.epochs=8",
                  "--set", "stage2.batch_size=8", "--set", "train.eval_every=5") == 0
    val = [m for m in read_metrics(out) if "val_loss" in m]
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"]
    assert (out / "model" / "model.safetensors").is_file()
    allowed = {".safetensors", ".json", ".jsonl", ".txt", ".jinja", ".md", ""}  # .md: the model card
    for path in out.rglob("*"):
        if path.is_file() and "tensorboard" not in path.parts:
            assert path.suffix in allowed, path
            if path.suffix == ".safetensors":
                load_file(path)  # parses as safetensors
            else:
                head = path.read_bytes()[:2]
                assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle/torch.save file"


def test_stage2_in_bf16_learns_and_saves_fp32_weights(shapes, stage1_run, tmp_path):
    """The CPU/GPU bf16 path: frozen LM in bf16, math attention on CPU, trainable weights kept fp32; the
    encoder in bf16 too, though stage 1 ran it in fp32 (its arithmetic may change, its weights not)."""
    out = tmp_path / "s2bf16"
    assert _train("stage2", *shapes, out, "--init", str(stage1_run), "--set", "stage2.epochs=8",
                  "--set", "stage2.batch_size=8", "--set", "train.eval_every=5",
                  "--set", "stage2.mixed_precision=bf16", "--set", "vision.precision=bf16") == 0
    val = [m for m in read_metrics(out) if "val_loss" in m]
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"]
    weights = load_file(out / "model" / "model.safetensors")
    lora = load_file(out / "model" / "lora" / "adapter_model.safetensors")  # the PEFT adapter folder
    assert {t.dtype for t in weights.values()} | {t.dtype for t in lora.values()} == {torch.float32}
    assert any("lora_A" in k for k in lora)


def test_length_grouping_cuts_the_logged_padding(shapes, stage1_run, tmp_path):
    """Stage 2 mixes short questions and longer prompted captions; grouped batches pad much less."""
    pad = {}
    for grouped in ("true", "false"):
        out = tmp_path / grouped
        assert _train("stage2", *shapes, out, "--init", str(stage1_run), "--set", "stage2.batch_size=8",
                      "--set", "train.log_every=10", "--set", "train.eval_every=100",
                      "--set", f"train.group_by_length={grouped}") == 0
        (record,) = [m for m in read_metrics(out) if "pad_fraction" in m]  # one epoch of 10 steps
        pad[grouped] = record["pad_fraction"]
    assert 0 <= pad["true"] < 0.7 * pad["false"]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_compiled_training_matches_eager_and_saves_plain_weights(stage, shapes, stage1_run, tmp_path):
    """`train.compile=true` (torch.compile through Accelerate): same losses as eager, same saved keys."""
    runs, frames = {}, {}
    init = ["--init", str(stage1_run)] if stage == "stage2" else []
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        runs[name] = tmp_path / name
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert _train(stage, *shapes, runs[name], *init, "--set", f"{stage}.max_steps=4",
                      "--set", f"{stage}.batch_size=8", "--set", "train.log_every=1",
                      "--set", "train.eval_every=4", "--set", f"train.compile={compiled}") == 0
        frames[name] = torch._dynamo.utils.counters["frames"]["ok"]  # frames dynamo compiled
    assert frames == {"eager": 0, "compiled": frames["compiled"]} and frames["compiled"] > 0
    losses = {name: [m["loss"] for m in read_metrics(run) if "loss" in m] for name, run in runs.items()}
    assert len(losses["compiled"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    eager, compiled = (load_file(run / "model" / "model.safetensors") for run in runs.values())
    assert compiled.keys() == eager.keys()  # no `_orig_mod.` prefixes from the compiled wrapper


def test_stage2_rejects_missing_or_mismatched_init(shapes, stage1_run, tmp_path, capsys):
    assert _train("stage2", *shapes, tmp_path / "a", "--init", str(tmp_path / "nope")) == 1
    assert "no such stage-1 run" in capsys.readouterr().err
    assert _train("stage2", *shapes, tmp_path / "b", "--init", str(stage1_run),
                  "--set", "qformer.num_queries=6") == 1
    assert "qformer.num_queries (--init: 4, here: 6)" in capsys.readouterr().err


def test_kill_and_resume_equals_uninterrupted(shapes, stage1_run, tmp_path):
    common = ["--init", str(stage1_run), "--set", "stage2.max_steps=30", "--set", "stage2.epochs=100",
              "--set", "train.save_every=10", "--set", "train.eval_every=1000"]
    assert _train("stage2", *shapes, tmp_path / "full", *common) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "qvlm.cli.main", "train", "stage2", "--preset", "tiny", "--data", str(shapes[0]),
           "--val", str(shapes[1]), "--out", str(killed), *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000010" / "state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    assert _train("stage2", *shapes, killed, *common, "--resume") == 0

    final_full = [m for m in read_metrics(tmp_path / "full") if "loss" in m][-1]
    final_resumed = [m for m in read_metrics(killed) if "loss" in m][-1]
    assert final_resumed["step"] == final_full["step"] == 30
    assert final_resumed["loss"] == pytest.approx(final_full["loss"], rel=1e-4, abs=1e-5)
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key


def test_nan_loss_stops_with_last_good_checkpoint(shapes, tmp_path, capsys):
    code = _train("stage1", *shapes, tmp_path / "nan", "--set", "stage1.lr_new=1e12",
                  "--set", "stage1.lr_pretrained=1e12", "--set", "stage1.epochs=50", "--set", "train.save_every=1",
                  "--set", "stage1.grad_clip=0")
    assert code == 1
    err = capsys.readouterr().err
    assert "loss became nan" in err.lower() and "last good checkpoint" in err.lower()


def test_two_cpu_processes_match_one_process_of_the_same_global_batch(shapes, tmp_path):
    """torchrun with 2 gloo processes of batch 4 == 1 process of batch 8: same data per step (every
    caption once per epoch), same first-step loss and gradient norm (ITC contrasts the gathered global
    batch), same final weights."""
    common = ["train", "stage1", "--preset", "tiny", "--data", str(shapes[0]), "--set", "stage1.epochs=1",
              "--set", "stage1.itm_weight=0", "--set", "stage1.itg_weight=0"]
    env = {**os.environ, "QVLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "qvlm.cli.main", *common, "--out", str(tmp_path / "one"),
                          "--set", "stage1.batch_size=8"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "qvlm.cli.main", *common, "--out", str(tmp_path / "two"),
                          "--set", "stage1.batch_size=4"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    logs = {name: [m for m in read_metrics(tmp_path / name) if "itc" in m] for name in ("one", "two")}
    assert [m["step"] for m in logs["two"]] == [1, 2, 3, 4, 5]  # 40 captions / (2 x 4) per step
    assert [m["step"] for m in logs["one"]] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm"):
        assert logs["two"][0][key] == pytest.approx(logs["one"][0][key], rel=1e-4)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

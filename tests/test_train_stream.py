"""Training from streams (issue 19): both stages on tar shards, online == cached features, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import read_metrics, write_shape_shards
from safetensors.torch import load_file

from qvlm.cli.main import main

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shape_shards(tmp_path_factory.mktemp("shards"))


def _train(stage: str, data: str, out: Path, *sets: str, extra: tuple[str, ...] = ()) -> int:
    args = ["train", stage, "--preset", "tiny", "--data", data, "--out", str(out), *extra,
            "--set", "train.stream=true", "--set", "train.log_every=1", "--set", "train.shuffle_buffer=8"]
    for item in sets:
        args += ["--set", item]
    return main(args)


def test_stream_needs_max_steps(shards, tmp_path, capsys):
    assert _train("stage1", shards, tmp_path / "r") == 1
    assert "set stage1.max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("stage, setting", [("stage1", "stage1.epochs=auto"), ("stage2", "stage2.epochs=auto"),
                                            ("stage2", "stage2.max_answer_tokens=auto")])
def test_auto_values_that_count_the_data_ask_a_stream_for_a_number(shards, tmp_path, capsys, stage, setting):
    assert _train(stage, shards, tmp_path / "r", setting, f"{stage}.max_steps=2") == 1
    assert f"{setting} " in capsys.readouterr().err  # names the setting; "set a number" follows


def test_streamed_stage1_online_equals_cached_and_stage2_trains(shards, tmp_path, capsys):
    """Online features are the cached ones up to fp16 rounding: same data order, nearly equal losses."""
    runs = {}
    for mode in ("cache", "online"):
        runs[mode] = tmp_path / mode
        assert _train("stage1", shards, runs[mode], "stage1.max_steps=6", "stage1.batch_size=8",
                      f"train.features={mode}", f"train.feature_cache={tmp_path / mode}-features") == 0
        said = capsys.readouterr().out
        assert f"features: {mode} (train.features={mode}" in said
    losses = {mode: [m["loss"] for m in read_metrics(run) if "loss" in m] for mode, run in runs.items()}
    assert len(losses["online"]) == 6 and losses["online"] == pytest.approx(losses["cache"], rel=2e-2)
    assert losses["cache"][-1] < losses["cache"][0]  # learns
    assert any((tmp_path / "cache-features").rglob("shard-*.safetensors"))
    assert not any((tmp_path / "online-features").rglob("shard-*.safetensors"))  # nothing cached online
    s2 = tmp_path / "s2"
    assert _train("stage2", shards, s2, "stage2.max_steps=4", "stage2.batch_size=4",
                  extra=("--init", str(runs["cache"]))) == 0
    assert [m["step"] for m in read_metrics(s2) if "loss" in m] == [1, 2, 3, 4]
    assert (s2 / "model").is_dir()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_on_a_stream_equals_the_uninterrupted_run(shards, tmp_path, workers):
    """40 captions in 4 shards, batches of 4: a checkpoint at step 5 is mid-epoch (and, with 2
    workers, after an odd number of batches). Resuming from it ends where the uninterrupted run ends."""
    sets = ("stage1.max_steps=10", "stage1.batch_size=4", "train.save_every=5", f"train.num_workers={workers}",
            "train.features=cache")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train("stage1", shards, full, *sets) == 0
    assert _train("stage1", shards, cut, *sets) == 0
    # interrupt after step 5: keep only its checkpoint and log lines
    shutil.rmtree(cut / "model")
    shutil.rmtree(cut / "checkpoints" / "step-000010")
    state = json.loads((cut / "checkpoints" / "step-000005" / "state.json").read_text())
    assert state["position"]["stream"]["batches"] == 5
    assert _train("stage1", shards, cut, *sets, extra=("--resume",)) == 0
    a, b = (load_file(run / "model" / "model.safetensors") for run in (full, cut))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert [m["loss"] for m in read_metrics(cut) if "loss" in m] == \
        pytest.approx([m["loss"] for m in read_metrics(full) if "loss" in m], rel=1e-5)


def test_two_processes_split_the_stream_and_resume_after_a_kill(shards, tmp_path):
    """torchrun, 2 gloo processes on 4 shards: killed after the step-4 checkpoint and resumed, the run ends
    with the weights of an uninterrupted 2-process run."""
    common = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qvlm.cli.main",
              "train", "stage1", "--preset", "tiny", "--data", shards, "--set", "train.stream=true",
              "--set", "stage1.max_steps=16", "--set", "stage1.batch_size=4", "--set", "train.save_every=4",
              "--set", "train.shuffle_buffer=8", "--set", "stage1.itm_weight=0", "--set", "stage1.itg_weight=0"]
    env = {**os.environ, "QVLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *common, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-000004" / "state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]  # torchrun's workers have sessions of their own
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=60)
    proc.wait()
    if (killed / "model").exists():
        pytest.fail("the run finished before it could be killed")
    newest = sorted((killed / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "state.json").read_text())
    assert sorted(state["position"]["stream"]["consumers"]) == ["0", "1"]  # both processes' positions
    resumed = subprocess.run([sys.executable, *common, "--out", str(killed), "--resume"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "full", killed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

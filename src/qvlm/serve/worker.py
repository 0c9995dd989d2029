"""One thread owns the model: requests queue here, and non-streamed ones with equal generation settings
are answered together in one batched `model.generate_text` call. Attention-map requests (`AttentionJob`)
share the queue and are batched among themselves into one `model.patch_attention` call.

`model.generate` is not thread-safe and CPU inference is already parallel inside torch, so running
requests in parallel threads would be both unsafe and no faster; batching is what raises throughput.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from PIL import Image

from qvlm.models.vlm import TokenCountingStreamer
from qvlm.serve.chat import GenSettings
from qvlm.serve.errors import APIError

log = logging.getLogger("qvlm.serve")
GONE_POLL_S = 0.25  # how often a waiting request checks that its client is still connected


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Job:
    image: Image.Image
    text: str
    gen: GenSettings
    future: Future = field(default_factory=Future)  # resolved with the Result (or the exception)
    # Streamed jobs get each text piece through `on_piece` before the future resolves.
    on_piece: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away

    def batch_key(self) -> tuple | None:
        """Queued jobs with equal keys share one model call; None: never batched (streamed)."""
        return None if self.on_piece else ("generate", self.gen)


@dataclass
class AttentionJob:
    """Where the Q-Former's queries look on `image` (after reading `text`, when instruction-aware); with
    `words`, also which queries each word of the model's answer to `text` drew on."""

    image: Image.Image
    text: str
    words: bool = False
    max_new_tokens: int = 32  # of the answer, with `words`
    future: Future = field(default_factory=Future)  # resolved with an `Attention` (or the exception)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        return ("attention", self.words, self.max_new_tokens)


@dataclass
class Attention:
    maps: torch.Tensor  # [Nq, G, G], each map summing to 1 (`QVLM.patch_attention`)
    words: dict | None = None  # `QVLM.word_query_attention`'s: tokens, queries [T, Nq], image_share [T]


_STOP = object()


class ModelWorker:
    def __init__(self, model, batch_size: int = 8, max_queue: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._held: deque[Job] = deque()  # taken off the queue but not batchable with the last batch
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qvlm-model-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, job: Job | AttentionJob) -> Future:
        if self.pending() >= self.max_queue:
            raise APIError(429, "the server is busy: too many queued requests, retry shortly",
                           code="queue_full", type_="rate_limit_error")
        self._queue.put(job)
        return job.future

    async def run(self, job: Job | AttentionJob,
                  gone: Callable[[], Awaitable[bool]] | None = None) -> Result | Attention | None:
        """Queue `job` and wait for its result; None when `gone()` says the client left meanwhile (the job
        is then cancelled, so a queue of abandoned requests costs no model time)."""
        future = asyncio.wrap_future(self.submit(job))
        while gone is not None:
            done, _ = await asyncio.wait({future}, timeout=GONE_POLL_S)
            if done:
                break
            if await gone():
                job.cancelled.set()
                return None
        return await future

    # -- the worker thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._held.popleft() if self._held else self._queue.get()
            if first is _STOP:
                return
            if _drop_if_cancelled(first):
                continue
            batch = self._collect(first) if first.batch_key() else [first]
            try:
                self._run(batch)
            except BaseException as e:  # a failed batch fails its requests, never the worker
                log.exception("model call failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _run(self, batch: list[Job] | list[AttentionJob]) -> None:
        if isinstance(batch[0], AttentionJob):
            self._attend(batch)
        elif batch[0].on_piece:
            self._stream(batch[0])
        else:
            self._answer(batch)

    def _collect(self, first: Job | AttentionJob) -> list[Job] | list[AttentionJob]:
        """`first` plus queued jobs with the same batch key (kind and settings), up to the batch size."""
        batch, others = [first], []
        while len(batch) < self.batch_size:
            if self._held:  # earlier arrivals first, so order is kept within each kind of request
                job = self._held.popleft()
            else:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
            if job is _STOP:
                others.append(job)
                break
            if _drop_if_cancelled(job):
                continue
            (batch if job.batch_key() == first.batch_key() else others).append(job)
        self._held.extendleft(reversed(others))
        return batch

    def _answer(self, batch: list[Job]) -> None:
        live = [j for j in batch if not _drop_if_cancelled(j)]
        if not live:
            return
        features = self.model.encode_images([j.image for j in live])
        done = self.model.generate_text(features, [j.text for j in live], **live[0].gen.kwargs())
        for i, job in enumerate(live):
            job.future.set_result(Result(done.texts[i], done.prompt_tokens[i], done.completion_tokens[i],
                                         "stop" if done.stopped[i] else "length"))

    def _attend(self, batch: list[AttentionJob]) -> None:
        live = [j for j in batch if not _drop_if_cancelled(j)]
        if not live:
            return
        features = self.model.encode_images([j.image for j in live])  # [B, P, Dv]
        texts = [j.text for j in live]
        maps = self.model.patch_attention(features, texts).cpu()  # [B, Nq, G, G]
        first = live[0]
        words = (self.model.word_query_attention(features, texts, max_new_tokens=first.max_new_tokens) if first.words
                 else [None] * len(live))
        for job, job_maps, job_words in zip(live, maps, words, strict=True):
            job.future.set_result(Attention(job_maps, job_words))

    def _stream(self, job: Job) -> None:
        pieces = []
        streamer = TokenCountingStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        for piece in self.model.stream(job.image, job.text, streamer=streamer, **job.gen.kwargs()):
            pieces.append(piece)
            job.on_piece(piece)
            if job.cancelled.is_set():
                break  # closing model.stream's generator stops its generation at the next token
        job.future.set_result(Result("".join(pieces).strip(), streamer.prompt_tokens, streamer.tokens,
                                     "stop" if streamer.stopped else "length"))


def _drop_if_cancelled(job: Job | AttentionJob) -> bool:
    """True (and the job's future cancelled) when its client has gone away."""
    if job.cancelled.is_set():
        job.future.cancel()
        return True
    return False

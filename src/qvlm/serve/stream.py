"""OpenAI streaming: `data: {chat.completion.chunk}` lines, role delta first, content deltas, a final
chunk with the finish_reason (and a usage chunk when asked), then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from qvlm.serve.errors import APIError, error_body
from qvlm.serve.worker import Job, ModelWorker

_END = object()


async def stream_chunks(worker: ModelWorker, job: Job, completion_id: str, model_id: str,
                        include_usage: bool) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    job.on_piece = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    future = worker.submit(job)  # raises 429 before anything is sent when the queue is full
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, _END))
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        first = True
        while (piece := await pieces.get()) is not _END:
            # model.stream's pieces keep the leading space of the first word; the full answer is stripped
            text = piece.lstrip() if first else piece
            if text:
                first = False
                yield chunk({"content": text})
        error = future.exception()
        if error is not None:
            body = error.body() if isinstance(error, APIError) else error_body(
                f"generation failed: {type(error).__name__}", type_="server_error")
            yield f"data: {json.dumps(body)}\n\n"
        else:
            result = future.result()
            yield chunk({}, result.finish_reason)
            if include_usage:
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model_id, "choices": [], "usage": result.usage()}
                yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or we are done): skip or cut the generation

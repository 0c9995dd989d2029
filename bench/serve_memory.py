"""Peak memory of `qvlm serve` under the issue-17 attack: N concurrent 5000×5000 16-bit RGBA PNGs.

Starts the real server (a `tiny`-preset stage-2 run, trained here in seconds) on 127.0.0.1 in its own
process, warms it with one small request, then sends the N requests at once from N threads and samples
the server's RSS every 5 ms. Prints each status code's count and the peak RSS growth over the idle RSS.

    python bench/serve_memory.py [--requests 40] [--decode-slots 2]
"""

from __future__ import annotations

import argparse
import base64
import collections
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny run and attack image

from serve_support import data_url, free_port, sample_image, sixteen_bit_png, tiny_trained_run  # noqa: E402

MiB = 1024 * 1024


def chat(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 4}


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded: the server either answers or the bench stops
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--decode-slots", type=int, default=2)
    args = parser.parse_args()

    image = sixteen_bit_png(5000)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    with tempfile.TemporaryDirectory() as tmp:
        run = tiny_trained_run(Path(tmp) / "tinyrun")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "qvlm.cli.main", "serve", str(run), "--port", str(port),
                                   "--decode-slots", str(args.decode_slots)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base, server)
            assert httpx.post(f"{base}/v1/chat/completions", json=chat(data_url(sample_image())),
                              timeout=60).status_code == 200
            proc = psutil.Process(server.pid)
            idle = proc.memory_info().rss
            peak, stop = [idle], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                codes = list(pool.map(lambda _: httpx.post(f"{base}/v1/chat/completions", json=chat(url),
                                                           timeout=600).status_code, range(args.requests)))
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            after = proc.memory_info().rss
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{args.requests} concurrent {len(image) // 1024} KB 5000x5000 16-bit RGBA PNGs, "
          f"decode slots {args.decode_slots}: status {dict(collections.Counter(codes))} in {elapsed:.1f} s")
    print(f"server RSS idle {idle / MiB:.0f} MiB, peak {peak[0] / MiB:.0f} MiB (+{(peak[0] - idle) / MiB:.0f} MiB), "
          f"after {after / MiB:.0f} MiB")


if __name__ == "__main__":
    main()

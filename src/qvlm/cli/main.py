"""Entry point of the `qvlm` command. Each command lives in its own module under `qvlm.cli`."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from qvlm import __version__
from qvlm.console import quiet_libraries

# Modules under qvlm.cli, each exposing `register(subparsers)`; the order is the order in --help.
COMMAND_MODULES: list[str] = ["info", "fetch", "data", "train", "infer", "evaluate", "report", "search", "serve", "export", "demo", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvlm",
        description="Build your own small vision-language model: frozen vision encoder, Q-Former, "
        "LoRA-tuned language model. Start with `qvlm demo` (offline, CPU).",
    )
    parser.add_argument("--version", action="version", version=f"qvlm {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' progress bars, advice and deprecation warnings")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qvlm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `qvlm train` records it for the model card
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from qvlm.errors import USER_ERRORS
    from qvlm.extras import missing_extra

    try:
        with warnings.catch_warnings():  # the filters last for this command only (tests call main())
            quiet_libraries(args.verbose)
            return args.func(args) or 0
    except USER_ERRORS as e:  # expected failures: one clear line, no traceback
        print(f"qvlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional package: say which extra brings it
        clear = missing_extra(e)
        if clear is None:
            raise
        print(f"qvlm {args.command}: error: {clear}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"qvlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""CLI plumbing shared by every command: one-line errors, ``--debug``, ``--verbose``, signals that clean up.

A user error (:class:`UserError`, or a bad argument) prints one line, ``prog: error: ...``, on stderr
and exits 2; ``--debug`` adds the traceback. ``--verbose`` shows the third-party notices hidden by
default (:mod:`.quiet`). Anything else is a bug and raises as usual. SIGTERM and
SIGHUP raise ``SystemExit`` so temp files and folders are removed on the way out, as on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from . import quiet
from .errors import UserError, one_line

Main = Callable[..., int]


class _Help(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the text already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error, ``--debug`` and ``--verbose``; defaults shown in every option's help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        self.add_argument(
            "--verbose",
            action="store_true",
            help="show the third-party warnings and log messages hidden by default (for debugging)",
        )

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "verbose", False):
            quiet.verbose()
        return parsed, rest

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def handle_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so staged outputs and locks are cleaned up."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)


def fail(prog: str, message: object) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return 2


def command(prog: str) -> Callable[[Main], Callable[..., int]]:
    """Wrap a ``main(argv) -> int``: user errors become one line and exit 2, bugs keep their traceback."""

    def wrap(main: Main) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None, **kwargs: Any) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            handle_signals()
            try:
                return main(args, **kwargs)
            except UserError as exc:
                if "--debug" in args:
                    traceback.print_exc()
                return fail(prog, exc)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap

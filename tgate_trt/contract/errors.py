"""User errors versus bugs.

A :class:`UserError` is something the user can fix (a bad argument, a modified export, a busy output
folder): every CLI prints it as one line and exits 2, the Python API raises it, Triton answers 400.
Anything else is a bug and keeps its traceback. ``UsageError`` is also a ``ValueError`` so API callers
that catch ``ValueError`` for bad arguments keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


class UsageError(UserError, ValueError):
    """An argument out of range or of the wrong kind."""


class OutputError(UserError, RuntimeError):
    """An output path that can't or mustn't be written (exists, not ours, overlaps a source, locked)."""


def one_line(message: object) -> str:
    """A message on one line: CLIs print user errors as ``prog: error: <one line>``."""
    return " ".join(str(message).split())

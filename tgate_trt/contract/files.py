"""Safe output: nothing half-written, one writer per output, ``--force`` replaces only our own folders.

Files are written to a temp name beside the destination and renamed (readers never see half a file).
Folders are built in a temp folder beside the destination and swapped in only when complete, under an
advisory lock so two writers to one ``--out`` can't both "succeed"; temp folders of killed runs are
removed by the next run that takes the lock. A folder we publish carries a marker file, and
``--force`` refuses to replace a folder without it (or our manifest), and anything that is, contains
or lies inside a source the command reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import OutputError

MARKER = ".tgate-trt"  # in every folder we publish: what --force may replace
MANIFEST_NAME = "manifest.json"


# --- files ---------------------------------------------------------------------------------------
def atomic_save(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` (same suffix), then rename it into place."""
    path = Path(path)
    if path.is_symlink():  # write through the link into its target; the link stays
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_dead_temps(path: Path) -> None:
    """Temp files of ``path`` whose writer (the pid in their name) is gone: a killed run's leftovers."""
    head = f".{path.stem}.tmp-"
    for stale in path.parent.glob(f"{glob.escape(head)}*{glob.escape(path.suffix)}"):
        pid = stale.name[len(head) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
            print(f"removed {stale}, left by an interrupted run", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 2) -> Path:
    """JSON that is valid JSON: NaN or infinity is a bug upstream, refused here instead of written."""
    return atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def check_output_file(
    path: str | os.PathLike[str], suffixes: Iterable[str] = (), option: str = "--out", create: bool = False
) -> Path:
    """A file the command will write: right suffix, not a folder, in an existing writable folder (or, with
    ``create``, one that can be made: the writer makes it)."""
    path = Path(path)
    allowed = tuple(suffixes)
    if path.is_dir():
        raise OutputError(
            f"{option} {path} is a folder: name a file inside it, e.g. {path / ('out' + (allowed or ('',))[0])}"
        )
    if allowed and path.suffix.lower() not in allowed:
        raise OutputError(f"{option} must be a {' or '.join(allowed)} path, got {path}")
    _check_parent(path.resolve() if path.is_symlink() else path, option, create=create)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path} exists and is read-only: choose another path")
    return path


def check_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """A folder the command writes files into (not replaced as a whole): a folder, or creatable, and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} exists and is not a folder: choose another {option}")
    _check_parent(path.resolve() if path.is_symlink() else path, option, create=True)
    if path.is_dir() and not writable(path):
        raise OutputError(f"{option} {path} is not writable; choose another location")
    OutputDir(path, option=option)._check_unlocked()
    return path


def acquire_lock(path: Path, busy: Callable[[str], Exception], wait: bool = False) -> int:
    """Take the advisory lock file ``path`` (its holder's pid written in it); returns its descriptor.

    Without ``wait`` a held lock raises ``busy(owner_pid)``. A lock file its previous holder unlinked
    while we waited is not the lock any more, so it is tried again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise busy(owner) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def release_lock(path: Path, fd: int) -> None:
    """Unlink the lock file, then let it go (the order :func:`acquire_lock`'s retry relies on)."""
    path.unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike[str], option: str = "--out", wait: bool = False) -> Iterator[None]:
    """One writer at a time for an output updated in place (not swapped): the lock :class:`OutputDir` takes.
    Without ``wait`` a busy output is an :class:`OutputError`; with it, the turn is awaited."""
    lock = OutputDir(path, option=option)
    lock.out.parent.mkdir(parents=True, exist_ok=True)
    lock._acquire(wait)
    try:
        yield
    finally:
        lock._release()


def _check_parent(path: Path, option: str, create: bool) -> None:
    """The folder ``path`` goes into exists (or, with ``create``, can be made) and is writable."""
    parent = Path(os.path.abspath(path)).parent
    ancestor = parent
    while not ancestor.exists():
        if not create:
            raise OutputError(f"the folder of {option} ({parent}) does not exist: create it first")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {path} lies under {ancestor}, which is a file, not a folder")
    if not writable(ancestor):
        raise OutputError(f"{option}: {ancestor} is not writable; choose another location")


def writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried, not guessed from its mode (root ignores modes,
    but not read-only mounts or immutable folders)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".tgate-trt-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


# --- folders -------------------------------------------------------------------------------------
def is_ours(folder: Path) -> bool:
    """A folder a previous run of ours published (marker, or an export's manifest)."""
    if (folder / MARKER).is_file():
        return True
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "graphs" in data


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


class OutputDir:
    """``with OutputDir(out, force=..., sources=[...]) as tmp:`` build in ``tmp``; it becomes ``out`` at the end.

    Call :meth:`check` first, before any expensive work: it raises :class:`OutputError` for an output
    that exists without ``force``, isn't ours, overlaps a source, contains the working folder, or lies
    in an unwritable place. A symlinked ``out`` is published into its target (the link stays).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        force: bool = False,
        sources: Iterable[str | os.PathLike[str] | None] = (),
        option: str = "--out",
    ) -> None:
        self.given = Path(out)
        self.out = Path(os.path.abspath(Path(out).expanduser()))
        if self.out.is_symlink():
            self.out = self.out.resolve()
        self.force, self.option = force, option
        self.sources = [Path(s).resolve() for s in sources if s is not None]
        self._lock: int | None = None
        self._tmp: Path | None = None

    @property
    def lock_path(self) -> Path:
        return self.out.parent / f".{self.out.name}.lock"

    def check(self) -> None:
        out, opt = self.out, self.option
        real = out.resolve()
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise OutputError(
                f"{opt} {self.given} is or contains the current folder: choose a new folder for the output"
            )
        for src in self.sources:
            if _overlaps(real, src):
                raise OutputError(
                    f"{opt} {self.given} is, contains or lies inside {src}, which this command reads: "
                    "choose an output folder outside it"
                )
        _check_parent(out, opt, create=True)
        if out.exists() and not out.is_dir():
            raise OutputError(f"{opt} {self.given} exists and is not a folder: choose another {opt}")
        if out.is_dir() and any(out.iterdir()):
            if not self.force:
                raise OutputError(
                    f"{opt} {self.given} is not empty: pass --force to replace it, or choose another {opt}"
                )
            if not is_ours(out):
                raise OutputError(
                    f"{opt} {self.given} is not an output of tgate-trt (no {MARKER} or {MANIFEST_NAME}): "
                    "--force only replaces previous outputs; choose another folder"
                )
            if not writable(out):
                raise OutputError(f"{opt} {self.given} is read-only: it can't be replaced")
        if self._lock is None:
            self._check_unlocked()

    def _busy(self, owner: str) -> OutputError:
        return OutputError(
            f"another process (pid {owner}) is writing {self.given}: wait for it to finish, "
            f"or choose another {self.option}"
        )

    def _check_unlocked(self) -> None:
        """Refuse early when another writer holds the lock (acquiring it, later, is what counts)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:  # no lock file: nobody is writing
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise self._busy(os.pread(fd, 32, 0).decode(errors="replace").strip() or "?") from None
        finally:
            os.close(fd)

    # --- the lock and the swap -----------------------------------------------------------------
    def _acquire(self, wait: bool = False) -> None:
        self._lock = acquire_lock(self.lock_path, self._busy, wait)

    def _release(self) -> None:
        if self._lock is not None:
            release_lock(self.lock_path, self._lock)
            self._lock = None

    def _remove_stale(self) -> None:
        """Temp folders of killed runs (only the lock holder makes them, so none is live now)."""
        for pattern in (f".{self.out.name}.tmp-*", f".{self.out.name}.old-*"):
            for stale in self.out.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
                print(f"removed {stale}, left by an interrupted run", file=sys.stderr)

    def __enter__(self) -> Path:
        self.check()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self.check()  # again under the lock: another writer may have published meanwhile
            self._remove_stale()
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            self._tmp.chmod(0o755)  # mkdtemp's 0700 would make the published folder private
            (self._tmp / MARKER).write_text(json.dumps({"tool": "tgate-trt"}) + "\n")
        except BaseException:
            self._release()
            raise
        return self._tmp

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        tmp, out = self._tmp, self.out
        assert tmp is not None
        try:
            if kind is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
                out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                if old is not None:
                    old.rename(out)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self._release()


@contextlib.contextmanager
def staged_dir(
    out: str | os.PathLike[str], force: bool = True, sources: Iterable[str | os.PathLike[str] | None] = ()
) -> Iterator[Path]:
    """Shorthand for ``with OutputDir(out, force, sources) as tmp``."""
    with OutputDir(out, force=force, sources=sources) as tmp:
        yield tmp

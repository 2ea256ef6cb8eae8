"""Run the real ``tritonserver`` that the nvidia-pytriton wheel ships (Triton 2.51, Python backend).

The wheel holds the server binary, its libraries (``nvidia_pytriton.libs``), the Python backend and
one stub per Python version. Serving needs a writable backends folder with the backend plus the stub
matching the environment's Python (and our ``tgate`` backend), and ``LD_LIBRARY_PATH`` pointing at
the wheel's libraries and at this Python's ``libpython`` (the stub links against it). This module
does that set-up and starts, waits for, restarts and stops the server, and lists its Python stub
processes (one per model instance) for the watchdog (:mod:`.watchdog`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ..contract.errors import UserError
from .repository import install_backend

INSTALL_HINT = "install the Triton extra: pip install 'tgate-trt[triton]' (nvidia-pytriton and tritonclient)"


STUB_NAME = "triton_python_backend_stub"


class TritonUnavailable(UserError, RuntimeError):
    """No usable tritonserver in this environment."""


class TritonStartError(UserError, RuntimeError):
    """tritonserver did not become ready (a model failed to load, a port was taken, ...)."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def first_error(log: str) -> str:
    """The first error line of a Triton log (``E1125 12:00:00.000 ... file.cc:12] "message"``), if any."""
    for line in log.splitlines():
        if line[:1] == "E" and line[1:5].isdigit():
            text = line.split("] ", 1)[-1].strip()
            return text[1:-1] if len(text) > 1 and text[0] == text[-1] == '"' else text
    return ""


@dataclass(frozen=True)
class TritonDist:
    """The server files inside the installed nvidia-pytriton wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self, version: str | None = None) -> Path:
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_tritonserver() -> TritonDist:
    """Locate the wheel's server without importing pytriton (which pulls in its own client stack)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable(f"nvidia-pytriton is not installed: {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDist(package / "tritonserver", package.parent / "nvidia_pytriton.libs")
    if not os.access(dist.binary, os.X_OK):
        raise TritonUnavailable(f"{dist.binary} is missing or not executable: reinstall nvidia-pytriton")
    if not dist.libs.is_dir():
        raise TritonUnavailable(f"{dist.libs} is missing: reinstall nvidia-pytriton (a wheel, not a source build)")
    if not dist.stub().is_file():
        raise TritonUnavailable(
            f"nvidia-pytriton has no Python backend stub for Python {sys.version_info.major}.{sys.version_info.minor}"
            f" ({dist.stub()})"
        )
    return dist


def prepare_backends(dest: str | os.PathLike[str], dist: TritonDist | None = None) -> Path:
    """``dest/python`` (Triton's Python backend with this Python's stub) and ``dest/tgate``."""
    dist = dist or find_tritonserver()
    dest = Path(dest)
    python = dest / "python"
    shutil.copytree(dist.root / "backends" / "python", python, dirs_exist_ok=True)
    stub = python / STUB_NAME
    staged = python / f".{STUB_NAME}.tmp"
    shutil.copy2(dist.stub(), staged)
    staged.chmod(0o755)
    os.replace(staged, stub)  # a renamed entry, so a stub still running from the old file doesn't block it
    install_backend(dest)
    return dest


def server_env(dist: TritonDist, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: its libraries, libpython for the stub, this environment's bin first."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [str(dist.libs), libdir, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in parts if p)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can't be bound now (another server holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class StubProcess:
    """One Python backend stub: a model instance's own process (``argv`` names the instance)."""

    pid: int
    state: str  # /proc state letter: R, S, D, Z (zombie: dead, not yet reaped) ...
    cpu_ticks: int  # user + system time so far, in clock ticks
    argv: tuple[str, ...] = field(default=())

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")

    def serves(self, instance: str) -> bool:
        return instance in self.argv[1:]


def stub_processes(parent: int) -> list[StubProcess]:
    """The Python backend stubs ``parent`` (the tritonserver process) started, from /proc."""
    stubs = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = tuple(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) != parent or not argv or Path(argv[0]).name != STUB_NAME:
            continue
        stubs.append(StubProcess(int(entry.name), fields[0], int(fields[11]) + int(fields[12]), argv))
    return stubs


class TritonServer:
    """One ``tritonserver`` process on ``host`` with free (or given) ports; a context manager.

    ``workdir`` receives the backends folder and, unless ``log_path`` names another file, ``tritonserver.log``.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        extra_args: list[str] | None = None,
        exit_timeout: int = 10,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.dist = find_tritonserver()
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise TritonStartError(f"model repository {self.repo} does not exist: run tgate-triton first")
        self.exit_timeout = exit_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tgate-triton-")).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.extra_args = list(extra_args or [])
        # the log is appended and kept where asked (default: in the work folder)
        self.log_path = Path(log_path).resolve() if log_path is not None else self.workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.dist.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--cache-directory={self.dist.root / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout}",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.workdir / "backends", self.dist)
        self._start = time.perf_counter()
        with open(self.log_path, "ab") as log:  # appended: a restarted server's log follows the last one
            self.process = subprocess.Popen(
                self.command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(self.dist),
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server ourselves
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from start to ready; raises with the log's tail if the server dies or times out."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                cause = first_error(tail) or "see the log"
                raise TritonStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready: {cause} "
                    f"(log: {self.log_path})",
                    tail,
                )
            if self.ready():
                self.startup_seconds = time.perf_counter() - self._start
                return self.startup_seconds
            time.sleep(0.25)
        raise TritonStartError(f"tritonserver not ready after {timeout:.0f}s (log: {self.log_path})", self.log_tail())

    def stop(self, timeout: float | None = None, cleanup: bool = True) -> None:
        """SIGTERM (Triton drains in-flight requests and unloads models, for up to its exit timeout),
        then SIGKILL for it and its stubs if it hangs; ``cleanup`` removes a workdir made here."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(self.exit_timeout + 20 if timeout is None else timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of its session: stubs, hung or orphaned
            proc.wait()
        if cleanup and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, timeout: float = 300.0) -> float:
        """Stop (gracefully) and start again on the same ports; seconds until ready again."""
        start = time.perf_counter()
        self.stop(cleanup=False)
        self.start()
        self.wait_ready(timeout)
        return time.perf_counter() - start

    def stubs(self) -> list[StubProcess]:
        """This server's Python stub processes (empty when it isn't running)."""
        return [] if self.process is None else stub_processes(self.process.pid)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

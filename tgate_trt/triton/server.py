"""Run the real ``tritonserver`` that the nvidia-pytriton wheel ships (Triton 2.51, Python backend).

The wheel holds the server binary, its libraries (``nvidia_pytriton.libs``), the Python backend and
one stub per Python version. Serving needs a writable backends folder with the backend plus the stub
matching the environment's Python (and our ``tgate`` backend), and ``LD_LIBRARY_PATH`` pointing at
the wheel's libraries and at this Python's ``libpython`` (the stub links against it). This module
does that set-up and starts, waits for and stops the server.
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..contract.errors import UserError
from .repository import install_backend

INSTALL_HINT = "install the Triton extra: pip install 'tgate-trt[triton]' (nvidia-pytriton and tritonclient)"


class TritonUnavailable(UserError, RuntimeError):
    """No usable tritonserver in this environment."""


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
    stub = python / "triton_python_backend_stub"
    shutil.copy2(dist.stub(), stub)
    stub.chmod(0o755)
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


class TritonServer:
    """One ``tritonserver`` process on ``host`` with free (or given) ports; a context manager.

    ``workdir`` receives the backends folder and ``tritonserver.log``.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.dist = find_tritonserver()
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} does not exist: run tgate-triton first")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tgate-triton-")).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.extra_args = list(extra_args or [])
        self.log_path = self.workdir / "tritonserver.log"
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
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.workdir / "backends", self.dist)
        self._start = time.perf_counter()
        with open(self.log_path, "wb") as log:
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
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready; "
                    f"log ({self.log_path}):\n{self.log_tail()}"
                )
            if self.ready():
                self.startup_seconds = time.perf_counter() - self._start
                return self.startup_seconds
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f}s; log ({self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Triton drains in-flight requests and unloads models), then SIGKILL if it hangs."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the stubs too: they are in its session
                proc.wait()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

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

"""Keep a served repository healthy: find dead model instances, restart tritonserver, answer probes.

Triton 2.51's Python backend does not restart a stub process that dies (killed, or out of memory):
the instance stays dead, its requests fail (or, for jobs it had queued, never get an answer), and
Triton's own ``/v2/health/live`` and ``/v2/health/ready`` keep answering 200. So ``tgate-triton --serve``
runs this watchdog beside the server. Every ``interval`` seconds it checks, for real:

* the tritonserver process is running;
* every instance of every READY model has its stub process, alive (``/proc``: a child of the server
  whose arguments name the instance; a zombie counts as dead);
* every ``probe_interval`` seconds, each tgate model answers a tiny request (an empty prompt) with its
  own refusal (HTTP 400, "prompt is empty") within ``probe_timeout``: that is a round trip through the
  server, the backend and the stub's Python, and costs no image work.

A failed check restarts the whole server (SIGTERM, Triton drains what it can for its exit timeout,
then it starts again on the same ports). The whole server, rather than reloading the one model: jobs
queued inside a dead stub have no one left to answer them, and only closing their connections tells
their clients; and Triton 2.51 never finishes unloading a model whose dead stub already failed a
request, so a reload would leave its healthy stubs (and their memory) behind. More than
``max_restarts`` restarts within ``restart_window`` seconds make the watchdog give up (exit 1), so an
orchestrator sees a crash loop instead of a pod that restarts itself forever.

:class:`HealthServer` answers Kubernetes-style probes from the watchdog's state:
``/live`` (the watchdog is running and has not given up) and ``/ready`` (tritonserver is up and
ready, no restart is under way, and the last check found every instance alive and answering).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .server import StubProcess, TritonServer, TritonStartError

PROBE = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [""]}]}
PROBE_ANSWER = "prompt is empty"  # what a live tgate model says to PROBE (contract.parse_request)


class WatchdogGaveUp(RuntimeError):
    """Too many restarts in too short a time: something a restart can't fix."""


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET (or a POST of ``body`` as JSON); status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def instance_names(config: dict[str, Any]) -> list[str]:
    """Instance names Triton gives a model's instance groups: ``<group>_<index>``."""
    names = []
    for group in config.get("instance_group", []):
        count = int(group.get("count", 1))
        if group.get("kind") == "KIND_GPU" and group.get("gpus"):
            count *= len(group["gpus"])
        names += [f"{group['name']}_{i}" for i in range(count)]
    return names


@dataclass
class ModelWatch:
    name: str
    instances: list[str]
    probe: bool  # a tgate model whose queue is in the model: PROBE is answered at once
    probe_failures: int = 0


@dataclass
class State:
    """What the probes report; written by the watchdog thread, read by the health server."""

    started: float = field(default_factory=time.monotonic)
    last_check: float = 0.0
    healthy: bool = False
    reason: str = "starting"
    restarting_since: float | None = None
    restarts: int = 0
    last_restart_seconds: float | None = None
    gave_up: bool = False


class Watchdog:
    """Checks ``server`` every ``interval`` seconds and restarts it when a check fails (see the module)."""

    def __init__(
        self,
        server: TritonServer,
        interval: float = 2.0,
        probe_interval: float = 10.0,
        probe_timeout: float = 30.0,
        probe_failures: int = 3,
        max_restarts: int = 5,
        restart_window: float = 600.0,
        restart_timeout: float = 600.0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.server = server
        self.interval, self.probe_interval, self.probe_timeout = interval, probe_interval, probe_timeout
        self.probe_failures, self.max_restarts, self.restart_window = probe_failures, max_restarts, restart_window
        self.restart_timeout = restart_timeout
        self.log = log
        self.state = State()
        self.models: list[ModelWatch] = []
        self._history: list[float] = []
        self._last_probe = 0.0
        self._stop = threading.Event()

    # --- what the server holds -------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://{self.server.http_url}"

    def discover(self) -> list[ModelWatch]:
        """READY models, their instance names, and which answer PROBE (from Triton's own API)."""
        status, body = _http(f"{self.base}/v2/repository/index", {"ready": True})
        if status != 200:
            raise RuntimeError(f"the repository index did not answer ({status}: {body[:200]})")
        models = []
        for entry in json.loads(body):
            if entry.get("state") != "READY":
                continue
            name = entry["name"]
            status, text = _http(f"{self.base}/v2/models/{name}/config")
            if status != 200:
                raise RuntimeError(f"model {name}'s config did not answer ({status}: {text[:200]})")
            config = json.loads(text)
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            probe = "default_steps" in params and params.get("queue", "") == "model"
            models.append(ModelWatch(name, instance_names(config), probe))
        return models

    # --- one check -------------------------------------------------------------------------------
    def check(self) -> str | None:
        """None when healthy, else what is wrong (the reason for a restart)."""
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            return f"tritonserver exited (code {None if proc is None else proc.returncode})"
        now = time.monotonic()
        probing = self.probe_interval > 0 and now - self._last_probe >= self.probe_interval
        stubs = self.server.stubs()
        if probing or any(not self._alive(i, stubs) for m in self.models for i in m.instances):
            self._rediscover()  # models loaded or unloaded through the API since the last look
            stubs = self.server.stubs()
        for model in self.models:
            dead = [i for i in model.instances if not self._alive(i, stubs)]
            if dead:
                return (
                    f"model {model.name}: the stub process of instance {', '.join(dead)} is gone "
                    "(killed, or out of memory)"
                )
        if probing:
            self._last_probe = now
            for model in self.models:
                problem = self.probe(model)
                model.probe_failures = model.probe_failures + 1 if problem else 0
                if model.probe_failures >= self.probe_failures:
                    return f"model {model.name} failed {model.probe_failures} probes in a row: {problem}"
        return None

    def _rediscover(self) -> None:
        failures = {m.name: m.probe_failures for m in self.models}
        try:
            self.models = self.discover()
        except (RuntimeError, ValueError, KeyError):
            return  # keep the last list; the server-process and probe checks still run
        for model in self.models:
            model.probe_failures = failures.get(model.name, 0)

    @staticmethod
    def _alive(instance: str, stubs: list[StubProcess]) -> bool:
        return any(s.alive and s.serves(instance) for s in stubs)

    def probe(self, model: ModelWatch) -> str | None:
        """One PROBE request; None when the model refused it the way a live one does."""
        if not model.probe:
            return None
        start = time.monotonic()
        status, body = _http(f"{self.base}/v2/models/{model.name}/infer", PROBE, timeout=self.probe_timeout)
        if status == 400 and PROBE_ANSWER in body:
            return None
        return f"answered {status or 'nothing'} after {time.monotonic() - start:.1f}s: {body[:200]}"

    # --- the loop --------------------------------------------------------------------------------
    def restart(self, reason: str) -> None:
        now = time.monotonic()
        self._history = [t for t in self._history if now - t < self.restart_window] + [now]
        if len(self._history) > self.max_restarts:
            self.state.gave_up = True
            raise WatchdogGaveUp(
                f"{reason}; {len(self._history) - 1} restarts in the last {self.restart_window:.0f}s did not help"
            )
        self.log(f"tgate-triton: watchdog: {reason}: restarting tritonserver")
        self.state.healthy, self.state.reason, self.state.restarting_since = False, reason, now
        try:
            seconds = self.server.restart(self.restart_timeout)
            self.models = self.discover()
        except (TritonStartError, RuntimeError) as exc:
            self.log(f"tgate-triton: watchdog: the restart failed: {exc}")
            return  # the next check sees the server down and tries again (within max_restarts)
        finally:
            self.state.restarting_since = None
        self.state.restarts += 1
        self.state.last_restart_seconds = seconds
        self.log(
            f"tgate-triton: watchdog: tritonserver ready again after {seconds:.1f}s (restart {self.state.restarts})"
        )

    def tick(self) -> None:
        reason = self.check()
        self.state.last_check = time.monotonic()
        if reason is None:
            self.state.healthy, self.state.reason = True, "ok"
            return
        self.state.healthy, self.state.reason = False, reason
        self.restart(reason)

    def run(self) -> None:
        """Check until :meth:`stop`; raises :class:`WatchdogGaveUp` when restarts don't help."""
        try:
            self.models = self.discover()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TritonStartError(f"tritonserver is up but its models can't be listed: {exc}") from exc
        self.state.healthy, self.state.reason = True, "ok"
        self.state.last_check = time.monotonic()
        while not self._stop.wait(self.interval):
            self.tick()

    def stop(self) -> None:
        self._stop.set()

    # --- probes ----------------------------------------------------------------------------------
    def live(self) -> tuple[bool, str]:
        """The watchdog is running (checked recently, or busy restarting within its timeout)."""
        state, now = self.state, time.monotonic()
        if state.gave_up:
            return False, f"the watchdog gave up: {state.reason}"
        if state.restarting_since is not None:
            if now - state.restarting_since > self.restart_timeout + 60:
                return False, f"a restart has been under way for {now - state.restarting_since:.0f}s"
            return True, "restarting"
        stale = max(10 * self.interval, 60.0) + self.probe_timeout * max(1, len(self.models))
        last = state.last_check or state.started
        if now - last > stale:
            return False, f"no check for {now - last:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Requests would be served: the last check passed, no restart is under way, Triton says ready."""
        state = self.state
        if state.restarting_since is not None:
            return False, f"restarting: {state.reason}"
        if not state.healthy:
            return False, state.reason
        status, _ = _http(f"{self.base}/v2/health/ready", timeout=2.0)
        if status != 200:
            return False, f"tritonserver's /v2/health/ready answered {status or 'nothing'}"
        return True, "ok"


class HealthServer:
    """``GET /live`` and ``GET /ready`` (200 or 503, a JSON body) for the watchdog, on ``host:port``."""

    def __init__(self, watchdog: Watchdog, host: str, port: int) -> None:
        dog = watchdog

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0].rstrip("/")
                if path in ("/live", "/livez", "/healthz"):
                    ok, reason = dog.live()
                elif path in ("/ready", "/readyz"):
                    ok, reason = dog.ready()
                else:
                    self.send_error(404, "GET /live or /ready")
                    return
                state = dog.state
                body = json.dumps(
                    {
                        "status": "ok" if ok else "failing",
                        "reason": reason,
                        "restarts": state.restarts,
                        "last_restart_seconds": state.last_restart_seconds,
                        "models": {m.name: m.instances for m in dog.models},
                    }
                ).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                pass  # probes every few seconds would flood the output

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tgate-health", daemon=True)

    def __enter__(self) -> HealthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

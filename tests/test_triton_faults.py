"""Faults against a real ``tgate-triton --serve`` (its tritonserver, its watchdog, its probe server).

One server per module, started as the CLI starts it (a subprocess), serves the tiny export with one
instance. The tests measure and hold:

* a bad request is refused at once while image jobs are queued (the model's own queue);
* the stub's memory goes back after a large request (ORT's shared CPU arena shrinks, malloc_trim);
* a stub killed during traffic (as the kernel's OOM killer would), or hung, is found by the watchdog
  (its process is gone; its probes fail), which restarts tritonserver; ``/ready`` says so meanwhile,
  and every later request succeeds, exactly.

Numbers are printed (``pytest -s``) for the README.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (triton extra) not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (triton extra) not installed")

import tritonclient.grpc as tritonclient_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tgate_trt.runtime.pipeline import TGatePipeline  # noqa: E402
from tgate_trt.triton import cli  # noqa: E402
from tgate_trt.triton.server import TritonUnavailable, find_tritonserver, free_port, stub_processes  # noqa: E402

try:
    find_tritonserver()
except TritonUnavailable as _exc:
    pytest.skip(str(_exc), allow_module_level=True)

pytestmark = pytest.mark.slow

MODEL = "tgate_faults"
THREADS = 1  # ORT threads, here and in the server, so images are bit-identical
JOB = {"steps": 200, "gate_step": 10, "height": 128, "width": 128}  # about a second of work each, on tiny
LARGE = 384  # a large-but-allowed size for the memory test (--max-pixels raised to 384*384)
TYPES = {
    "seed": ("INT64", np.int64),
    "steps": ("INT32", np.int32),
    "gate_step": ("INT32", np.int32),
    "guidance_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
}


@dataclass
class Served:
    proc: subprocess.Popen[str]
    http: str
    grpc: str
    health: str
    output: list[str]

    def server_pid(self) -> int:
        """The tritonserver process the CLI runs (a child of it)."""
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == self.proc.pid and Path(argv[0].decode()).name == "tritonserver":
                return int(entry.name)
        raise AssertionError(f"no tritonserver under pid {self.proc.pid}; output:\n{''.join(self.output)}")

    def stub_pid(self) -> int:
        [stub] = [s for s in stub_processes(self.server_pid()) if s.alive and s.serves(f"{MODEL}_0_0")]
        return stub.pid

    def probe(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://{self.health}{path}", timeout=5) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read())


def _rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("triton-faults") / "repo"
    argv = [str(tiny_export), "--repo", str(repo), "--name", MODEL, "--threads", str(THREADS), "--link"]
    assert cli.main([*argv, "--max-steps", "200", "--max-pixels", str(LARGE * LARGE)]) == 0
    http, grpc, health = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "tgate_trt.triton.cli", "--serve", str(repo), "--http-port", str(http)]
    cmd += ["--grpc-port", str(grpc), "--health-port", str(health), "--watchdog", "0.5", "--probe-interval", "2"]
    cmd += ["--probe-timeout", "3", "--exit-timeout", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if line.startswith("watchdog every"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    served = Served(proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{health}", output)
    try:
        deadline = time.monotonic() + 600
        while not ready.wait(0.5):
            assert proc.poll() is None, f"tgate-triton --serve exited {proc.returncode}:\n{''.join(output)}"
            assert time.monotonic() < deadline, "".join(output)
        print("".join(output), end="")
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)  # the CLI stops tritonserver on its way out
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def local(tiny_export: Path) -> TGatePipeline:
    return TGatePipeline.from_export(tiny_export, threads=THREADS)


def generate(url: str, prompt: str, protocol: str = "http", **params: Any) -> np.ndarray:
    module: Any = tritonclient_http if protocol == "http" else tritonclient_grpc
    timeout = {"network_timeout": 300.0} if protocol == "http" else {}
    client = module.InferenceServerClient(url, **timeout)
    inputs = []
    text = module.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs.append(text)
    for name, value in params.items():
        wire, dtype = TYPES[name]
        tensor = module.InferInput(name, [1], wire)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        inputs.append(tensor)
    result = client.infer(MODEL, inputs, outputs=[module.InferRequestedOutput("image")])
    return np.asarray(result.as_numpy("image"))


def _expected(pipe: TGatePipeline, prompt: str, **p: Any) -> np.ndarray:
    result = pipe(
        prompt, num_inference_steps=p["steps"], gate_step=p["gate_step"], height=p["height"], width=p["width"],
        seed=p["seed"],
    )  # fmt: skip
    return np.asarray(result.images[0].convert("RGB"), dtype=np.uint8)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_request_is_not_queued_behind_image_jobs(served: Served, protocol: str) -> None:
    url = served.http if protocol == "http" else served.grpc
    done: list[float] = []
    start = time.perf_counter()

    def job(i: int) -> None:
        generate(served.http, f"queued job {i}", seed=i, **JOB)
        done.append(time.perf_counter() - start)

    jobs = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for thread in jobs:
        thread.start()
    time.sleep(0.5)  # the four jobs are in: one runs, three wait
    sent = time.perf_counter()
    with pytest.raises(InferenceServerException) as err:
        generate(url, "a red circle", protocol, height=40)
    refused = time.perf_counter() - sent
    for thread in jobs:
        thread.join()
    assert "multiples of 16" in str(err.value)
    assert len(done) == 4, "a queued job failed"
    ends = ", ".join(f"{t:.1f}" for t in sorted(done))
    print(f"\n{protocol}: bad request refused in {refused * 1000:.1f} ms; the 4 queued jobs ended at {ends} s")
    assert refused < 1.0 < max(done) - (sent - start)  # refused long before the queue drained


def test_memory_goes_back_after_a_large_request(served: Served) -> None:
    stub = served.stub_pid()
    generate(served.http, "warm up", steps=2, gate_step=1, height=64, width=64, seed=0)
    before = _rss_mib(stub)
    image = generate(served.http, "a large one", steps=4, gate_step=2, height=LARGE, width=LARGE, seed=1)
    assert image.shape == (LARGE, LARGE, 3)
    time.sleep(1.0)  # the worker releases memory after it has sent the response
    after = _rss_mib(stub)
    hwm = next(int(x.split()[1]) // 1024 for x in Path(f"/proc/{stub}/status").read_text().splitlines() if "VmHWM" in x)
    print(f"\nstub RSS: {before} MiB before a {LARGE}x{LARGE} request, peak {hwm} MiB, {after} MiB after")
    assert hwm - before > 200  # the request did need the memory ...
    assert after - before < 100  # ... and gave it back


FAULTS = {  # signal -> what the watchdog says
    "killed (SIGKILL, as the OOM killer does)": (signal.SIGKILL, "is gone (killed, or out of memory)"),
    "hung (SIGSTOP)": (signal.SIGSTOP, "probes in a row"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_dead_stub_is_restarted_and_later_requests_succeed(served: Served, local: TGatePipeline, fault: str) -> None:
    sig, reason = FAULTS[fault]
    status, body = served.probe("/ready")
    assert status == 200, body
    restarts = body["restarts"]
    victim = served.stub_pid()
    outcomes: list[tuple[float, bool]] = []
    stop = threading.Event()

    def traffic(i: int) -> None:
        while not stop.is_set():
            try:
                generate(served.http, f"traffic {i}", seed=i, steps=8, gate_step=4, height=64, width=64)
                outcomes.append((time.monotonic(), True))
            except Exception:
                outcomes.append((time.monotonic(), False))
                time.sleep(0.2)

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    killed = time.monotonic()
    os.kill(victim, sig)
    seen_not_ready = False
    while True:
        status, body = served.probe("/ready")
        seen_not_ready |= status == 503
        if status == 200 and body["restarts"] > restarts:
            break
        assert time.monotonic() - killed < 300, f"not ready again: {body}\n{''.join(served.output)}"
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert seen_not_ready, "/ready never said the server was down"
    assert served.probe("/live")[0] == 200
    assert served.stub_pid() != victim
    before = [ok for t, ok in outcomes if t < killed]
    after = [ok for t, ok in outcomes if t > killed + recovered]
    assert before and all(before) and after and all(after), (len(before), before.count(False), after)
    restart = body["last_restart_seconds"]
    print(f"\nstub {fault}: ready again after {recovered:.1f}s (of which the restart itself {restart:.1f}s)")
    # the restarted model serves the pipeline's images, exactly, concurrently too
    params = {"seed": 21, "steps": 6, "gate_step": 3, "height": 64, "width": 64}
    want = _expected(local, "a blue square after the restart", **params)
    results: list[np.ndarray] = []
    workers = [
        threading.Thread(
            target=lambda: results.append(generate(served.http, "a blue square after the restart", **params))
        )
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4
    for image in results:
        np.testing.assert_array_equal(image, want)
    assert reason in "".join(served.output)

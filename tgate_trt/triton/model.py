"""Triton Python model hosting ``TGatePipeline``: one request, one image per prompt.

This file is copied as-is into a model's version folder (``<repo>/<model>/1/model.py``) or installed
as a Python-based backend (``<backends>/tgate/model.py``); it only runs inside Triton's Python stub.
It imports nothing from the environment at module level: the stub's interpreter may not see the
environment's packages yet, so ``initialize`` first puts them on ``sys.path`` (from the ``site_packages``
parameter) and only then imports numpy and tgate_trt.

Requests are checked on arrival (``tgate_trt.triton.contract.parse_request``, then the pipeline's own
checks), and a bad one is answered at once (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT). With the
``queue`` parameter at ``model`` (the default) good requests wait in this instance's own queue and one
worker thread runs them in order, answering through each request's response sender, so ``execute``
returns at once and a bad request never waits behind image jobs; with ``triton`` they wait in Triton's
queue and ``execute`` runs them itself. Each request is independent: the T-GATE caches live in the
pipeline call's locals, so instances and consecutive requests can't share one.

Memory: the ONNX Runtime sessions this model creates share one CPU arena (parameter ``ort_cpu_arena``:
``shared``, ``session`` or ``off``), and after every image job a one-token text encoder run shrinks it
and glibc's ``malloc_trim(0)`` follows, so a large request's memory goes back to the system instead of
staying with the stub, at the arena's speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import site
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found, unused-ignore]  # Triton's stub


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _add_site_packages(paths: str) -> None:
    """The environment's site-packages, with its .pth files (editable installs), if not already seen."""
    for path in filter(None, paths.split(os.pathsep)):
        if path not in sys.path and os.path.isdir(path):
            site.addsitedir(path)


def _pin_device(kind: str, device_id: str) -> None:
    """GPU instances see only their own device (as device 0), set before CUDA is first initialised."""
    if kind != "GPU":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(device_id)] if devices else device_id


def _flag(params: dict[str, str], key: str, default: bool) -> bool:
    text = params.get(key, "").strip().lower()
    return default if not text else text in ("1", "true", "yes", "on")


def _memory() -> str:
    """This instance's memory, for the log: resident now and at its peak (Linux ``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        now, peak = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
        return f"RSS {now:.0f} MiB, peak {peak:.0f} MiB"
    except (OSError, KeyError, ValueError):
        return "memory not readable here"


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: hand freed heap memory back to the system (a no-op elsewhere)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def release() -> None:
        trim(0)

    return release


def _arena_shrinker(pipe: Any, mode: str) -> Callable[[], None]:
    """A tiny run (a text encoder on one token) that asks ORT to shrink the shared CPU arena after it:
    every free chunk goes back to the system. A no-op unless the arena is ``shared``."""
    if mode != "shared":
        return lambda: None
    import numpy as np
    import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

    from tgate_trt import manifest as mf

    engine = pipe.engines.get(mf.TEXT_ENCODER)
    session = getattr(engine, "session", None)
    if not isinstance(session, ort.InferenceSession):
        return lambda: None
    feeds = {
        spec.name: np.zeros([d if isinstance(d, int) else 1 for d in spec.shape], dtype=spec.dtype)
        for spec in pipe.manifest.graphs[mf.TEXT_ENCODER].inputs
    }
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def shrink() -> None:
        session.run(None, feeds, options)

    return shrink


def _error(message: str, code: str = "INVALID_ARG") -> Any:
    value = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)


def _error_response(message: str, code: str = "INVALID_ARG") -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=_error(" ".join(message.split()), code))


class TritonPythonModel:
    """Loads the export named by the ``artifacts`` parameter; hashes are checked before serving."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        _add_site_packages(params.get("site_packages", ""))
        import numpy as np

        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"numpy {np.__version__} ({np.__file__}) is loaded in the Triton Python stub; its tensors come "
                "back with the wrong size under numpy 2. Point EXECUTION_ENV_PATH at an environment with "
                "numpy<2 (tgate-triton writes it) or start tritonserver with that environment's bin/ first on PATH"
            )
        kind = args.get("model_instance_kind", "CPU")
        _pin_device(kind, args.get("model_instance_device_id", "0"))

        from tgate_trt.runtime.pipeline import TGatePipeline
        from tgate_trt.triton.contract import Settings

        self.np = np
        self.name = args.get("model_instance_name", config.get("name", "tgate"))
        settings = Settings.from_parameters(params)  # a bad config fails here, before the export loads
        artifacts = Path(params.get("artifacts", ""))
        if not artifacts.is_absolute():
            artifacts = Path(args["model_repository"]).resolve() / artifacts
        start = time.perf_counter()
        backend = params.get("backend", "ort")
        providers = ["CPUExecutionProvider"] if kind == "CPU" and backend == "ort" else None  # KIND_CPU: no CUDA
        arena = (params.get("ort_cpu_arena") or "shared").strip().lower() if backend == "ort" else "session"
        # from_export checks every file of the export against its sha256 in manifest.json (graphs,
        # tokenizer, scheduler, configs); a missing or changed file fails the load, naming the file.
        self.pipe: Any = TGatePipeline.from_export(
            artifacts,
            backend=backend,
            providers=providers,
            threads=int(params.get("threads", "0") or 0),
            engines=params.get("engines") or None,
            max_pixels=settings.pixel_cap,
            cpu_arena=arena,
        )
        self.settings = Settings.from_parameters(params, size_multiple=self.pipe.manifest.size_multiple)
        self._shrink = _arena_shrinker(self.pipe, arena)
        self._trim = _malloc_trim() if _flag(params, "malloc_trim", True) else (lambda: None)
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.worker: threading.Thread | None = None
        if self.settings.queue == "model":
            self.worker = threading.Thread(target=self._work, name=f"{self.name}-jobs", daemon=True)
            self.worker.start()
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {artifacts} ({backend}, {kind}, queue {self.settings.queue}, "
            f"ORT CPU arena {arena}) in {time.perf_counter() - start:.1f}s; {_memory()}"
        )

    # --- one request ---------------------------------------------------------------------------
    def _input(self, request: Any, name: str) -> Any:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _admit(self, request: Any) -> tuple[Any, set[str]]:
        """The parsed request and the outputs to send, or a ValueError saying what is wrong (no graph runs)."""
        from tgate_trt.triton.contract import IMAGE, IMAGES, RequestError, parse_request

        req = parse_request(lambda name: self._input(request, name), self.settings)
        self.pipe.check(*req.check_args())  # readable tokens, negative prompts, the graphs' shapes
        wanted = set(request.requested_output_names())
        if req.batch > 1 and IMAGE in wanted and IMAGES not in wanted:
            raise RequestError(
                f"{req.batch} prompts make {req.batch} images: request the output '{IMAGES}' "
                f"([{req.batch}, H, W, 3]); '{IMAGE}' holds the image of a one-prompt request"
            )
        return req, wanted

    def _run(self, req: Any, wanted: set[str]) -> Any:
        from tgate_trt.triton.contract import IMAGE, IMAGES, TRUNCATED

        np = self.np
        result = self.pipe(**req.pipeline_kwargs(), scheduler=self.settings.scheduler or None)
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
        outputs = []
        if IMAGE in wanted and req.batch == 1:
            outputs.append(pb_utils.Tensor(IMAGE, np.ascontiguousarray(images[0])))
        if IMAGES in wanted:
            outputs.append(pb_utils.Tensor(IMAGES, np.ascontiguousarray(images)))
        if TRUNCATED in wanted:
            counts = [result.truncated.get(i, 0) for i in range(req.batch)]
            outputs.append(pb_utils.Tensor(TRUNCATED, np.array(counts, dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _failed(self, exc: Exception) -> Any:
        if isinstance(exc, ValueError):  # a bad request (RequestError, UsageError): the client's to fix
            return _error_response(str(exc))
        pb_utils.Logger.log_error(f"{self.name}: {type(exc).__name__}: {exc}")  # anything else fails this request only
        return _error_response(f"{type(exc).__name__}: {exc}", "INTERNAL")

    def _generate(self, req: Any, wanted: set[str]) -> Any:
        try:
            return self._run(req, wanted)
        except Exception as exc:
            return self._failed(exc)

    def _release(self) -> None:
        """After an image job: the ORT arena's free chunks, then glibc's free heap, back to the system."""
        try:
            self._shrink()
            self._trim()
        except Exception as exc:  # memory stays with the process; serving goes on
            pb_utils.Logger.log_warn(f"{self.name}: could not release memory: {type(exc).__name__}: {exc}")
        pb_utils.Logger.log_info(f"{self.name}: after a request, {_memory()}")

    # --- Triton's entry points -----------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any] | None:
        if self.worker is None:  # queue "triton": run here, in order; Triton holds the waiting requests
            responses = []
            for request in requests:
                try:
                    req, wanted = self._admit(request)
                except Exception as exc:
                    responses.append(self._failed(exc))
                    continue
                responses.append(self._generate(req, wanted))
                self._release()
            return responses
        for request in requests:  # queue "model": refuse now, or hand the job to the worker
            sender = request.get_response_sender()
            try:
                req, wanted = self._admit(request)
            except Exception as exc:
                sender.send(self._failed(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.jobs.put((request, sender, req, wanted))
        return None

    def _cancelled(self, request: Any) -> bool:
        try:
            return bool(request.is_cancelled())
        except Exception:  # older stubs: no cancellation
            return False

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            request, sender, req, wanted = job
            if self._cancelled(request):
                response = _error_response("the request was cancelled before it ran", "CANCELLED")
            else:
                response = self._generate(req, wanted)
            try:
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client went away; the next job still runs
                pb_utils.Logger.log_warn(f"{self.name}: could not send a response: {exc}")
            del response, job, request, sender  # the image tensors, before the memory is released
            self._release()

    def finalize(self) -> None:
        """Unload: queued jobs are refused (UNAVAILABLE: send them again), the running one finishes."""
        if self.worker is not None:
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    response = _error_response("the model is unloading: send the request again", "UNAVAILABLE")
                    with contextlib.suppress(Exception):
                        job[1].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.jobs.put(None)
            self.worker.join()
        self.pipe = None

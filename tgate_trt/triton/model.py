"""Triton Python model hosting ``TGatePipeline``: one request, one image.

This file is copied as-is into a model's version folder (``<repo>/<model>/1/model.py``) or installed
as a Python-based backend (``<backends>/tgate/model.py``); it only runs inside Triton's Python stub.
It imports nothing from the environment at module level: the stub's interpreter may not see the
environment's packages yet, so ``initialize`` first puts them on ``sys.path`` (from the ``site_packages``
parameter) and only then imports numpy and tgate_trt.

Each request is independent: the T-GATE caches live in the pipeline call's locals (tensors, never
module state), so concurrent instances and consecutive requests can't share a cache. A bad request
gets an error response and the model keeps serving.
"""

from __future__ import annotations

import json
import os
import site
import sys
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub


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


def _error(message: str, invalid: bool) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


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
        self.settings = Settings.from_parameters(params)
        artifacts = Path(params.get("artifacts", ""))
        if not artifacts.is_absolute():
            artifacts = Path(args["model_repository"]).resolve() / artifacts
        start = time.perf_counter()
        # from_export checks every artifact against its sha256 in manifest.json (ManifestError names the file).
        backend = params.get("backend", "ort")
        providers = ["CPUExecutionProvider"] if kind == "CPU" and backend == "ort" else None  # KIND_CPU: no CUDA
        self.pipe = TGatePipeline.from_export(
            artifacts,
            backend=backend,
            providers=providers,
            threads=int(params.get("threads", "0") or 0),
            engines=params.get("engines") or None,
        )
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {artifacts} ({backend}, {kind}) in {time.perf_counter() - start:.1f}s"
        )

    def _input(self, request: Any, name: str) -> Any:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _run(self, request: Any) -> Any:
        from tgate_trt.triton.contract import IMAGE, parse_request

        req = parse_request(lambda name: self._input(request, name), self.settings)
        result = self.pipe(**req.pipeline_kwargs(), scheduler=self.settings.scheduler or None)
        image = self.np.ascontiguousarray(self.np.asarray(result.images[0].convert("RGB"), dtype=self.np.uint8))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(IMAGE, image)])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except ValueError as exc:  # bad request (contract.RequestError, or a size the graphs can't take)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc), True)))
            except Exception as exc:  # anything else fails this request only; the model keeps serving
                pb_utils.Logger.log_error(f"{self.name}: {type(exc).__name__}: {exc}")
                message = f"{type(exc).__name__}: {exc}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(message, False)))
        return responses

    def finalize(self) -> None:
        self.pipe = None

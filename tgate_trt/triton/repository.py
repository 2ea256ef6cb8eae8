"""Write a Triton model repository entry for an export, and install the ``tgate`` Python-based backend.

Layout of one model (both forms)::

    <repo>/<name>/config.pbtxt          inputs/outputs from .contract, settings as parameters
    <repo>/<name>/1/model.py            form "model" only (form "backend" says backend: "tgate")
    <repo>/<name>/1/artifacts/          the export folder, copied (absent with link=True)

Everything is checked (flags and the output folder first, then the manifest and the sha256 of every
file of the export, then the settings) before a byte is copied. The model folder is written through
:class:`~tgate_trt.contract.files.OutputDir`: built under a temp name in ``repo`` and renamed into place
under a lock, so a failed run leaves no half-written model for Triton to trip over; ``--force`` replaces
only a model folder this tool wrote, never the export it reads.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .. import manifest as mf
from ..contract import limits
from ..contract.errors import OutputError, UserError
from ..contract.files import OutputDir, atomic_write_text
from .config import BACKEND_NAME, FORMS, KINDS, render_config
from .contract import DEFAULT_MAX_BATCH, DEFAULT_MAX_STEPS, QUEUES, Settings

MODEL_FILE = Path(__file__).with_name("model.py")
VERSION = "1"
ARTIFACTS = "artifacts"
BACKENDS = ("ort", "openvino", "trt")


class RepositoryError(UserError, RuntimeError):
    """The repository can't be written as asked; the message says why and what to do."""


@dataclass
class RepoOptions:
    name: str = "sd15_tgate"
    form: str = "model"  # "model": model.py in the version folder; "backend": backend "tgate"
    kind: str = "cpu"
    instances: int = 1
    backend: str = "ort"
    link: bool = False  # reference the export folder instead of copying it
    max_steps: int = DEFAULT_MAX_STEPS
    threads: int = 0  # intra-op threads per instance (0: the backend's default)
    engines: str = ""  # OpenVINO build folder inside the export ("": openvino)
    steps: int | None = None  # defaults for requests that leave them out (None: the export's)
    gate_step: int | None = None
    guidance_scale: float | None = None
    scheduler: str = ""
    max_pixels: int | None = None  # pixels per image (None: the export's cap on this host, Manifest.pixel_cap)
    max_batch: int = DEFAULT_MAX_BATCH  # prompts per request
    queue: str = "model"  # where image jobs wait: "model" (bad requests refused on arrival) or "triton"
    env: Path | None = None  # Python environment the stub runs in (None: this interpreter's)
    force: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # more parameters, e.g. for tests

    def check(self) -> None:
        if not self.name or self.name.startswith(".") or "/" in self.name or os.sep in self.name:
            raise RepositoryError(f"--name must be a plain folder name, got {self.name!r}")
        if self.form not in FORMS:
            raise RepositoryError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.kind not in KINDS:
            raise RepositoryError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.backend not in BACKENDS:
            raise RepositoryError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "trt" and self.kind != "gpu":
            raise RepositoryError("--backend trt runs TensorRT engines on a GPU: use it with --kind gpu")
        if self.backend == "openvino" and self.kind != "cpu":
            raise RepositoryError("--backend openvino serves OpenVINO CPU builds: use it with --kind cpu")
        if self.engines and self.backend != "openvino":
            raise RepositoryError("--engines names an OpenVINO build: use it with --backend openvino")
        if self.instances < 1:
            raise RepositoryError(f"--instances must be >= 1, got {self.instances}")
        if self.threads < 0:
            raise RepositoryError(f"--threads must be >= 0, got {self.threads}")
        if self.queue not in QUEUES:
            raise RepositoryError(f"--queue must be one of {', '.join(QUEUES)}, got {self.queue!r}")
        try:
            if self.max_pixels is not None:
                limits.check_int("--max-pixels", self.max_pixels, 1)
            limits.check_int("--max-batch", self.max_batch, 1, limits.MAX_BATCH)
            limits.check_int("--max-steps", self.max_steps, 1, limits.MAX_STEPS)
        except ValueError as exc:
            raise RepositoryError(str(exc)) from exc


def environment_parameters(env: Path | None = None) -> dict[str, str]:
    """Where the stub finds numpy, torch and tgate_trt.

    Triton's Python stub starts its interpreter isolated (PYTHONPATH is ignored), so it sees only the
    base Python's packages. ``EXECUTION_ENV_PATH`` (a folder with ``bin/activate``) makes the backend
    start the stub inside that environment; ``site_packages`` is the model's own fallback.
    """
    if env is None:
        prefix = Path(sys.prefix)
        paths = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    else:
        prefix = env.resolve()
        if not prefix.is_dir():
            raise RepositoryError(f"--env {env} is not a folder")
        paths = sorted(glob.glob(str(prefix / "lib" / "python3*" / "site-packages")))
        if not paths:
            raise RepositoryError(f"--env {env} has no lib/python3*/site-packages: not a Python environment")
    params = {"site_packages": os.pathsep.join(dict.fromkeys(p for p in paths if p and os.path.isdir(p)))}
    if (prefix / "bin" / "activate").is_file():
        params["EXECUTION_ENV_PATH"] = str(prefix)
    return params


def _settings(manifest: mf.Manifest, opts: RepoOptions) -> Settings:
    d = manifest.defaults
    settings = Settings(
        steps=d["steps"] if opts.steps is None else opts.steps,
        gate_step=d["gate_step"] if opts.gate_step is None else opts.gate_step,
        guidance_scale=float(d["guidance_scale"] if opts.guidance_scale is None else opts.guidance_scale),
        height=int(d["height"]),
        width=int(d["width"]),
        max_steps=opts.max_steps,
        scheduler=opts.scheduler,
        size_multiple=manifest.size_multiple,
        # the export's cap with this host's memory split among the instances (each loads its own copy)
        max_pixels=manifest.pixel_cap(share=opts.instances) if opts.max_pixels is None else opts.max_pixels,
        max_batch=opts.max_batch,
        queue=opts.queue,
        schedule=manifest.schedule,
        sp_interval=int(d["sp_interval"]),
        fi_interval=int(d["fi_interval"]),
        warm_up=int(d["warm_up"]),
    )
    try:
        settings.check()
    except ValueError as exc:
        raise RepositoryError(str(exc)) from exc
    return settings


def has_engines(export_dir: Path, manifest: mf.Manifest) -> bool:
    return (export_dir / "engines" / "engines.json").is_file() or "plans" in manifest.extra.get("engines", {})


def model_output(export_dir: Path, repo: Path, opts: RepoOptions) -> OutputDir:
    """The model folder ``repo/<name>`` as an output that must not overlap the export it is made from."""
    return OutputDir(repo / opts.name, force=opts.force, sources=[export_dir], option="--repo/--name")


def generate_repository(export_dir: str | os.PathLike[str], repo: str | os.PathLike[str], opts: RepoOptions) -> Path:
    """Write ``repo/<name>`` for the export; returns the model folder.

    Order: flags, the output folder (exists without --force, not ours, overlaps the export), the
    export (schema, sha256 of every file), the settings; only then is anything written."""
    opts.check()
    export_dir, repo = Path(export_dir).resolve(), Path(repo)
    output = model_output(export_dir, repo, opts)
    output.check()
    env = environment_parameters(opts.env)
    try:
        manifest = mf.Manifest.load(export_dir, verify=True)
    except (mf.ManifestError, ValueError) as exc:
        raise RepositoryError(str(exc)) from exc
    settings = _settings(manifest, opts)
    if opts.backend == "trt" and not has_engines(export_dir, manifest):
        print(
            f"tgate-triton: warning: {export_dir} has no TensorRT engines yet; build them with "
            f"tgate-build {export_dir} (on the serving GPU) before starting the server",
            file=sys.stderr,
        )
    if opts.backend == "openvino":
        from ..runtime.ov_engine import OV_DIR, find_section, verify_files

        try:
            verify_files(export_dir, find_section(export_dir, manifest, opts.engines or OV_DIR))
        except mf.ManifestError as exc:
            raise RepositoryError(str(exc)) from exc
    params = {
        **settings.to_parameters(),
        **env,
        "artifacts": str(export_dir) if opts.link else f"{VERSION}/{ARTIFACTS}",
        "backend": opts.backend,
        "threads": str(opts.threads),
        "engines": opts.engines,
        **opts.extra,
    }
    config = render_config(opts.name, form=opts.form, kind=opts.kind, instances=opts.instances, parameters=params)

    with output as tmp:
        version = tmp / VERSION
        version.mkdir()
        if opts.form == "model":
            shutil.copy2(MODEL_FILE, version / "model.py")
        if not opts.link:
            shutil.copytree(export_dir, version / ARTIFACTS)
        (tmp / "config.pbtxt").write_text(config)
    return output.out


def install_backend(backends_dir: str | os.PathLike[str]) -> Path:
    """Install ``<backends_dir>/tgate/model.py`` (atomically), the Python-based backend form.

    Triton serves it with its Python backend, which must also be in ``backends_dir`` (``python/``;
    :func:`tgate_trt.triton.server.prepare_backends` sets up both from the nvidia-pytriton wheel).
    """
    folder = Path(backends_dir) / BACKEND_NAME
    path = folder / "model.py"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, MODEL_FILE.read_text())
    except OSError as exc:
        raise OutputError(f"can't install the backend into {folder}: {exc.strerror or exc}") from exc
    return path

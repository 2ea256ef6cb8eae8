"""``tgate-triton``: a Triton model repository for an export, the ``tgate`` backend, and a local server.

tgate-triton EXPORT_DIR --repo OUT [--name sd15_tgate] [--kind cpu|gpu] [--instances N] [--backend ort|openvino|trt]
tgate-triton --as-backend DIR          # install DIR/tgate/model.py (Python-based backend)
tgate-triton --serve OUT               # run the nvidia-pytriton tritonserver on a repository
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from .config import FORMS, KINDS
from .contract import DEFAULT_MAX_STEPS
from .repository import BACKENDS, RepoOptions, RepositoryError, generate_repository, install_backend


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgate-triton", description="Serve a tgate-export folder with Triton Inference Server."
    )
    p.add_argument("export_dir", type=Path, nargs="?", help="folder written by tgate-export")
    mode = p.add_argument_group("what to do (one of)")
    mode.add_argument("--repo", type=Path, help="write the model into this Triton model repository")
    mode.add_argument("--as-backend", type=Path, metavar="DIR", help="install the backend as DIR/tgate/model.py")
    mode.add_argument("--serve", type=Path, metavar="REPO", help="run tritonserver (from nvidia-pytriton) on REPO")
    g = p.add_argument_group("model (with --repo)")
    g.add_argument("--name", default="sd15_tgate", help="model name in the repository")
    g.add_argument("--kind", default="cpu", choices=tuple(KINDS), help="instance kind (KIND_CPU / KIND_GPU)")
    g.add_argument("--instances", type=int, default=1, help="model instances (concurrent requests)")
    g.add_argument("--backend", default="ort", choices=BACKENDS, help="runtime backend inside the model")
    g.add_argument(
        "--form",
        default="model",
        choices=FORMS,
        help='"model": model.py in the version folder; "backend": config says backend "tgate" (--as-backend)',
    )
    g.add_argument(
        "--engines", default="", help="with --backend openvino: build folder inside the export (default: openvino)"
    )
    g.add_argument("--link", action="store_true", help="reference EXPORT_DIR instead of copying it")
    g.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="requests asking more steps fail")
    g.add_argument("--threads", type=int, default=0, help="threads per instance (0: the backend's default)")
    g.add_argument("--steps", type=int, default=None, help="default steps (default: the export's)")
    g.add_argument("--gate", type=int, default=None, help="default gate step (default: the export's)")
    g.add_argument("--guidance", type=float, default=None, help="default guidance scale (default: the export's)")
    g.add_argument("--scheduler", default="", help="scheduler for every request (default: the export's own)")
    g.add_argument("--env", type=Path, default=None, help="Python environment the model runs in (default: this)")
    g.add_argument("--force", action="store_true", help="replace an existing model of the same name")
    s = p.add_argument_group("server (with --serve)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    return p


def _fail(msg: str) -> int:
    print(f"tgate-triton: error: {msg}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from .server import TritonServer, TritonUnavailable

    try:
        with tempfile.TemporaryDirectory(prefix="tgate-triton-") as work:
            server = TritonServer(args.serve, work, args.host, args.http_port, args.grpc_port)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run __exit__, which stops the server
            try:
                with server:
                    print(
                        f"tritonserver ready in {server.startup_seconds:.1f}s: HTTP {server.http_url}, "
                        f"gRPC {server.grpc_url}; log {server.log_path} (Ctrl-C stops it)",
                        flush=True,
                    )
                    assert server.process is not None
                    code = server.process.wait()
                    print(f"tritonserver exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
                    return 1
            except KeyboardInterrupt:
                return 0
    except (TritonUnavailable, FileNotFoundError, RuntimeError) as exc:
        return _fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m for m in ("repo", "as_backend", "serve") if getattr(args, m) is not None]
    if len(modes) != 1:
        return _fail("give exactly one of --repo (with EXPORT_DIR), --as-backend DIR, --serve REPO")
    if args.serve is not None:
        return _serve(args)
    if args.as_backend is not None:
        path = install_backend(args.as_backend)
        print(f'installed the tgate backend: {path} (serve models whose config.pbtxt says backend: "tgate")')
        return 0
    if args.export_dir is None:
        return _fail("--repo needs EXPORT_DIR, the folder written by tgate-export")
    opts = RepoOptions(
        name=args.name,
        form=args.form,
        kind=args.kind,
        instances=args.instances,
        backend=args.backend,
        link=args.link,
        max_steps=args.max_steps,
        threads=args.threads,
        engines=args.engines,
        steps=args.steps,
        gate_step=args.gate,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        env=args.env,
        force=args.force,
    )
    try:
        model = generate_repository(args.export_dir, args.repo, opts)
    except (RepositoryError, OSError) as exc:
        return _fail(str(exc))
    how = "model.py" if opts.form == "model" else 'backend "tgate", installed with --as-backend'
    where = "linked" if opts.link else "copied"
    print(f"wrote {model}: {how}; {opts.instances} x {opts.kind}, {opts.backend}; artifacts {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

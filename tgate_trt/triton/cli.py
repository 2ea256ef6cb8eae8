"""``tgate-triton``: a Triton model repository for an export, the ``tgate`` backend, and a local server.

tgate-triton EXPORT_DIR --repo OUT [--name sd15_tgate] [--kind cpu|gpu] [--instances N] [--backend ort|openvino|trt]
tgate-triton --as-backend DIR          # install DIR/tgate/model.py (Python-based backend)
tgate-triton --serve OUT               # run the nvidia-pytriton tritonserver on a repository, with a watchdog

A mistake (a bad flag, a modified export, an output that isn't ours) is one line on stderr and exit 2,
found before anything is written or started.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract.args import ABSENT, BackendArgs, OutputArgs, SamplingArgs, SizeArgs, parse
from ..contract.cli import Parser, command
from ..contract.errors import UsageError
from ..contract.files import check_output_file
from .config import FORMS, KINDS
from .contract import DEFAULT_MAX_BATCH, DEFAULT_MAX_STEPS, QUEUES
from .repository import BACKENDS, RepoOptions, generate_repository, install_backend

if TYPE_CHECKING:
    from .server import TritonServer

PROG = "tgate-triton"


WITH_REPO = "with --repo: "
SAMPLING = SamplingArgs(
    steps=None,
    gate=None,
    guidance=None,
    context=WITH_REPO + "defaults of the requests that leave them out",
)
SIZE = SizeArgs(
    side=ABSENT,
    context=WITH_REPO + "the cap of requests",
    help={"max_pixels": "pixels per image a request may ask (default: the export's cap)"},
)
BACKEND = BackendArgs(
    backends=BACKENDS,
    engines="",
    threads_zero="the backend's default",
    context=WITH_REPO + "inside each model instance",
    help={"threads": "threads per instance (0: the backend's default)"},
)
OUTPUT = OutputArgs(force="replace a model folder this tool wrote earlier", context=WITH_REPO + "the model folder")
REPO_GROUPS = (SAMPLING, SIZE, BACKEND, OUTPUT)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Serve a tgate-export folder with Triton Inference Server.")
    p.add_argument("export_dir", type=Path, nargs="?", help="folder written by tgate-export")
    mode = p.add_argument_group("what to do (one of)")
    mode.add_argument("--repo", type=Path, help="write the model into this Triton model repository")
    mode.add_argument("--as-backend", type=Path, metavar="DIR", help="install the backend as DIR/tgate/model.py")
    mode.add_argument("--serve", type=Path, metavar="REPO", help="run tritonserver (from nvidia-pytriton) on REPO")
    g = p.add_argument_group("model (with --repo)")
    g.add_argument("--name", default="sd15_tgate", help="model name in the repository")
    g.add_argument("--kind", default="cpu", choices=tuple(KINDS), help="instance kind (KIND_CPU / KIND_GPU)")
    g.add_argument("--instances", type=int, default=1, help="model instances (concurrent requests)")
    g.add_argument(
        "--form",
        default="model",
        choices=FORMS,
        help='"model": model.py in the version folder; "backend": config says backend "tgate" (--as-backend)',
    )
    g.add_argument("--link", action="store_true", help="reference EXPORT_DIR instead of copying it")
    g.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="requests asking more steps fail")
    g.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="prompts per request")
    g.add_argument(
        "--queue",
        default="model",
        choices=QUEUES,
        help='where image jobs wait: "model" (inside the instance; bad requests are refused on arrival) or '
        '"triton" (Triton\'s queue; a bad request waits for its turn)',
    )
    g.add_argument("--scheduler", default="", help="scheduler for every request (default: the export's own)")
    g.add_argument("--env", type=Path, default=None, help="Python environment the model runs in (default: this)")
    for group in REPO_GROUPS:
        group.add_to(p)
    s = p.add_argument_group("server (with --serve)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP/REST port")
    s.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    s.add_argument("--health-port", type=int, default=8003, help="the watchdog's /live and /ready probes (0: none)")
    s.add_argument(
        "--watchdog", type=float, default=2.0, metavar="SECONDS", help="seconds between health checks (0: no watchdog)"
    )
    s.add_argument("--probe-interval", type=float, default=10.0, help="seconds between probe requests to each model")
    s.add_argument(
        "--probe-timeout", type=float, default=30.0, help="seconds a probe request may take (3 misses: restart)"
    )
    s.add_argument("--exit-timeout", type=int, default=10, help="seconds Triton drains requests when stopping")
    s.add_argument(
        "--log",
        type=Path,
        default=Path("out/triton/tritonserver.log"),
        help="tritonserver's log, appended and kept after the server stops",
    )
    return p


def _port(name: str, port: int, zero_ok: bool = False) -> int:
    if not (zero_ok and port == 0) and not 1 <= port <= 65535:
        raise UsageError(f"{name} must be in 1..65535{' (or 0)' if zero_ok else ''}, got {port}")
    return port


def _check_serve(args: argparse.Namespace) -> None:
    """Cheap checks before a server starts: the repository holds models, the ports are usable and free."""
    from .server import port_in_use

    repo = args.serve
    if not repo.is_dir():
        raise UsageError(f"--serve {repo}: no such folder: write a repository with {PROG} EXPORT --repo first")
    if not any(repo.glob("*/config.pbtxt")):
        raise UsageError(f"--serve {repo} holds no model (no */config.pbtxt): write one with {PROG} EXPORT --repo")
    ports = {"--http-port": _port("--http-port", args.http_port), "--grpc-port": _port("--grpc-port", args.grpc_port)}
    if args.health_port:
        ports["--health-port"] = _port("--health-port", args.health_port, zero_ok=True)
    if len(set(ports.values())) != len(ports):
        raise UsageError(f"{', '.join(ports)} must differ, got {', '.join(str(v) for v in ports.values())}")
    for name, port in ports.items():
        if port_in_use(args.host, port):
            raise UsageError(f"{name} {port} on {args.host} is in use (another server?): choose another port")
    if args.watchdog < 0 or args.probe_interval < 0 or args.probe_timeout <= 0:
        raise UsageError("--watchdog and --probe-interval must be >= 0 seconds, --probe-timeout > 0")
    if args.exit_timeout < 0:
        raise UsageError(f"--exit-timeout must be >= 0 seconds, got {args.exit_timeout}")


def _serve(args: argparse.Namespace) -> int:
    from .server import TritonServer, TritonStartError

    _check_serve(args)
    if args.log == build_parser().get_default("log"):
        args.log.parent.mkdir(parents=True, exist_ok=True)  # the default folder, under out/
    check_output_file(args.log, option="--log")
    with tempfile.TemporaryDirectory(prefix="tgate-triton-") as work:
        # explicit model control, every model loaded at start: models can be (re)loaded through the API
        server = TritonServer(
            args.serve,
            work,
            args.host,
            args.http_port,
            args.grpc_port,
            extra_args=["--model-control-mode=explicit", "--load-model=*"],
            exit_timeout=args.exit_timeout,
            log_path=args.log,
        )
        try:
            with server:
                print(
                    f"tritonserver ready in {server.startup_seconds:.1f}s: HTTP {server.http_url}, "
                    f"gRPC {server.grpc_url}; log {server.log_path} (Ctrl-C stops it)",
                    flush=True,
                )
                return _supervise(server, args)
        except TritonStartError as exc:
            if args.debug and exc.log_tail:
                print(exc.log_tail, file=sys.stderr)
            raise


def _supervise(server: TritonServer, args: argparse.Namespace) -> int:
    """Run the watchdog (and its probe server) until a signal; without a watchdog, wait for the server."""
    from .watchdog import HealthServer, Watchdog, WatchdogGaveUp

    if args.watchdog <= 0:
        assert server.process is not None
        code = server.process.wait()
        print(f"{PROG}: tritonserver exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    dog = Watchdog(
        server,
        interval=args.watchdog,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        log=lambda line: print(line, flush=True),
    )
    with contextlib.ExitStack() as stack:
        if args.health_port:
            health = stack.enter_context(HealthServer(dog, args.host, args.health_port))
            print(
                f"watchdog every {args.watchdog:g}s; probes: http://{args.host}:{health.port}/live and /ready",
                flush=True,
            )
        try:
            dog.run()
        except WatchdogGaveUp as exc:
            print(f"{PROG}: watchdog: giving up: {exc}\n{server.log_tail()}", file=sys.stderr)
            return 1
    return 0


@command(PROG)
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    modes = [m for m in ("repo", "as_backend", "serve") if getattr(args, m) is not None]
    if len(modes) != 1:
        raise UsageError("give exactly one of --repo (with EXPORT_DIR), --as-backend DIR, --serve REPO")
    if args.serve is not None:
        return _serve(args)
    if args.as_backend is not None:
        path = install_backend(args.as_backend)
        print(f'installed the tgate backend: {path} (serve models whose config.pbtxt says backend: "tgate")')
        return 0
    if args.export_dir is None:
        raise UsageError("--repo needs EXPORT_DIR, the folder written by tgate-export")
    parse(args, *REPO_GROUPS)
    opts = RepoOptions(
        name=args.name,
        form=args.form,
        kind=args.kind,
        instances=args.instances,
        backend=args.backend,
        link=args.link,
        max_steps=args.max_steps,
        max_pixels=args.max_pixels,
        max_batch=args.max_batch,
        queue=args.queue,
        threads=args.threads,
        engines=args.engines,
        steps=args.steps,
        gate_step=args.gate,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        env=args.env,
        force=args.force,
    )
    model = generate_repository(args.export_dir, args.repo, opts)
    how = "model.py" if opts.form == "model" else 'backend "tgate", installed with --as-backend'
    where = "linked" if opts.link else "copied"
    print(f"wrote {model}: {how}; {opts.instances} x {opts.kind}, {opts.backend}; artifacts {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

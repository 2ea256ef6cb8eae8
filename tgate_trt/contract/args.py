"""Argument groups shared by every CLI: each option is defined, documented and checked here, once.

Like Polygraphy's ``tools/args``: a group is configured with a tool's defaults, adds its options to a
parser (under its own title, or into a group the tool already has) and checks the parsed values, raising
the same one-line :class:`UsageError` in every tool. So ``--steps 0`` reads the same through ``tgate run``,
``tgate bench`` and ``tgate macs``, and a bound changes in one place (the numbers come from :mod:`.limits`).

The argparse ``dest`` names are the usual ones (``steps``, ``max_pixels``, ``sp_interval``...), so the rest
of a tool reads ``args`` as before. A value left at a ``None`` default means "unset" (the export's, the
model's) and is not checked here; the tool fills it in and the API checks it.
"""

from __future__ import annotations

import argparse
import enum
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import limits
from .errors import UsageError

Container = argparse._ActionsContainer  # an ArgumentParser or one of its argument groups


class _Absent(enum.Enum):
    ABSENT = "absent"


ABSENT: Literal[_Absent.ABSENT] = _Absent.ABSENT  # an option the tool does not have
Default = Any  # an option's default (None: unset), or ABSENT

GATE_WHY = ": the cache comes from a step before the gate; use --gate >= --steps for no gating"
SEED_WHY = " (seeds are 0..2**63-1)"
INTERVAL_WHY = " (1 recomputes self-attention every step)"
THREADS_WHY = " (0: the backend's choice)"  # what 0 means exactly, each tool's help says
BACKEND_HELP = {"ort": "ONNX Runtime", "openvino": "needs tgate-build --target openvino", "trt": "TensorRT"}
ENGINES_MISPLACED = "--engines names an OpenVINO build: use it with --backend openvino"


class ArgGroup:
    """A set of options one place defines and checks: ``add_to`` a parser, then ``parse`` the namespace."""

    title: ClassVar[str]
    flags: ClassVar[tuple[str, ...]]  # every option the group can add (for ``tgate --help`` and the tests)

    def __init__(self, context: str | None = None, help: Mapping[str, str] | None = None) -> None:
        self.context = context  # when the tool uses the options, added to the title: "sampling (with --repo)"
        self.help = dict(help or {})

    def add_to(self, target: Container) -> Container:
        """Add the options: a parser gets them under the group's title, an argument group gets them as is."""
        container = target  # the tool's own group (e.g. "OpenVINO (--target openvino)")
        if isinstance(target, argparse.ArgumentParser):
            title = f"{self.title} ({self.context})" if self.context else self.title
            container = target.add_argument_group(title)
        self._add(container)
        return container

    def parse(self, args: argparse.Namespace) -> argparse.Namespace:
        """Check the values (raises :class:`UsageError`); returns ``args`` for chaining."""
        return args

    @functools.cached_property
    def defaults(self) -> dict[str, Default]:
        """``dest -> default`` of the options this tool has, read off a scratch parser so that a tool's API
        (which checks its arguments with ``parse`` too) knows them without building the CLI's parser."""
        scratch = argparse.ArgumentParser(add_help=False)
        self._add(scratch)
        return {action.dest: action.default for action in scratch._actions}

    def _add(self, container: Container) -> None:
        raise NotImplementedError

    def _option(self, container: Container, flag: str, default: Default, text: str, unset: str = "", **kw: Any) -> None:
        """One option, tagged with its group; a ``None`` default says what unset means in its help."""
        if default is ABSENT:
            return
        dest = kw.pop("dest", flag.lstrip("-").replace("-", "_"))
        text = self.help.get(dest, text + (f" (default: {unset})" if default is None and unset else ""))
        action = container.add_argument(flag, dest=dest, default=default, help=text, **kw)
        action.arg_group = type(self).__name__  # type: ignore[attr-defined]  # "defined here", for the tests

    def _given(self, args: argparse.Namespace, dest: str) -> bool:
        """Whether ``dest`` is this tool's and holds a value to check (None is "unset" only when the default is)."""
        if dest not in self.defaults:
            return False
        return getattr(args, dest, None) is not None or self.defaults[dest] is not None


class SamplingArgs(ArgGroup):
    """``--steps``, ``--gate``, ``--guidance``, ``--seed``: what every sampling tool asks the same way."""

    title = "sampling"
    flags = ("--steps", "--gate", "--guidance", "--seed")

    def __init__(
        self,
        *,
        steps: Default = ABSENT,
        gate: Default = ABSENT,
        guidance: Default = ABSENT,
        seed: Default = ABSENT,
        min_steps: int = 1,
        steps_why: str = "",
        gate_upto_steps: bool = False,
        guidance_flag: str = "--guidance",
        unset: str = "the export's",
        context: str | None = None,
        help: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(context, help)
        self.values = {"steps": steps, "gate": gate, "guidance": guidance, "seed": seed}
        self.min_steps, self.steps_why, self.gate_upto_steps = min_steps, steps_why, gate_upto_steps
        self.guidance_flag, self.unset = guidance_flag, unset

    def _add(self, container: Container) -> None:
        v, unset = self.values, self.unset
        steps = f"denoising steps, {self.min_steps}..{limits.MAX_STEPS}"
        self._option(container, "--steps", v["steps"], steps, unset, type=int)
        self._option(container, "--gate", v["gate"], "gate step; >= --steps: no gating", unset, type=int)
        guidance = "guidance scale, 0..100: CFG weight, or LCM's embedded guidance"
        self._option(container, self.guidance_flag, v["guidance"], guidance, unset, type=float)
        self._option(container, "--seed", v["seed"], "noise seed, 0..2**63-1 (same seed, same image)", type=int)

    @property
    def guidance_dest(self) -> str:
        return self.guidance_flag.lstrip("-").replace("-", "_")

    def parse(self, args: argparse.Namespace) -> argparse.Namespace:
        if self._given(args, "steps"):
            limits.check_int("--steps", args.steps, self.min_steps, limits.MAX_STEPS, self.steps_why)
        if self._given(args, "gate"):
            if self.gate_upto_steps:  # a step of this run (a plot's mark), not a gate rule
                limits.check_int("--gate", args.gate, 1, args.steps)
            else:
                limits.check_int("--gate", args.gate, 1, None, GATE_WHY)
        if self._given(args, self.guidance_dest):
            value = getattr(args, self.guidance_dest)
            limits.check_float(self.guidance_flag, value, 0.0, limits.GUIDANCE_MAX)
        if self._given(args, "seed"):
            limits.check_int("--seed", args.seed, 0, limits.SEED_MAX, SEED_WHY)
        return args


class SizeArgs(ArgGroup):
    """``--height``, ``--width``, ``--max-pixels``: the image size and the pixel cap (a memory budget)."""

    title = "image size"
    flags = ("--height", "--width", "--max-pixels")

    def __init__(
        self,
        *,
        side: Default = None,
        max_pixels: bool = True,
        max_side: int | None = None,
        unset: str = "the export's",
        context: str | None = None,
        help: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(context, help)
        self.side, self.max_pixels, self.max_side, self.unset = side, max_pixels, max_side, unset

    def _add(self, container: Container) -> None:
        self._option(container, "--height", self.side, "image height in pixels", self.unset, type=int)
        self._option(container, "--width", self.side, "image width in pixels", self.unset, type=int)
        cap = "cap on height*width, a memory budget"
        default = None if self.max_pixels else ABSENT
        self._option(container, "--max-pixels", default, cap, "the export's, 4x its native size", type=int)

    def parse(self, args: argparse.Namespace) -> argparse.Namespace:
        for dest in ("height", "width"):
            if self._given(args, dest):
                limits.check_int(f"--{dest}", getattr(args, dest), 1, self.max_side)
        if self._given(args, "max_pixels"):
            limits.check_int("--max-pixels", args.max_pixels, 1)
        return args


class ScheduleArgs(ArgGroup):
    """``--sp-interval``, ``--fi-interval``, ``--warm-up``: T-GATE V2's self-attention schedule."""

    title = "T-GATE V2 schedule"  # self-attention cached too, recomputed every N steps
    flags = ("--sp-interval", "--fi-interval", "--warm-up")

    def __init__(
        self,
        *,
        sp_interval: Default = None,
        fi_interval: Default = None,
        warm_up: Default = None,
        unset: str = "the export's",
        context: str | None = None,
        help: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(context, help)
        self.values = {"sp_interval": sp_interval, "fi_interval": fi_interval, "warm_up": warm_up}
        self.unset = unset

    def _add(self, container: Container) -> None:
        v, unset = self.values, self.unset
        sp = "before the gate, recompute self-attention every N steps; 1: always"
        self._option(container, "--sp-interval", v["sp_interval"], sp, unset, type=int)
        fi = "after the gate, recompute self-attention every N steps; 1: always"
        self._option(container, "--fi-interval", v["fi_interval"], fi, unset, type=int)
        wu = "steps before self-attention caching starts"
        self._option(container, "--warm-up", v["warm_up"], wu, unset, type=int)

    def parse(self, args: argparse.Namespace) -> argparse.Namespace:
        for dest in ("sp_interval", "fi_interval"):
            if self._given(args, dest):
                flag = "--" + dest.replace("_", "-")
                limits.check_int(flag, getattr(args, dest), 1, limits.MAX_STEPS, INTERVAL_WHY)
        if self._given(args, "warm_up"):
            limits.check_int("--warm-up", args.warm_up, 0, limits.MAX_STEPS)
        return args


class BackendArgs(ArgGroup):
    """``--backend``, ``--engines``, ``--threads``: what runs the graphs, and on how many threads."""

    title = "runtime backend"
    flags = ("--backend", "--engines", "--threads")

    def __init__(
        self,
        *,
        backends: tuple[str, ...] = (),
        backend: str = "ort",
        engines: Default = ABSENT,
        threads: Default = 0,
        threads_zero: str = "the backend's choice",
        context: str | None = None,
        help: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(context, help)
        self.backends, self.backend, self.engines = backends, backend if backends else ABSENT, engines
        self.threads, self.threads_zero = threads, threads_zero

    def _add(self, container: Container) -> None:
        names = [f"{b} ({BACKEND_HELP[b]})" if b in BACKEND_HELP else b for b in self.backends]
        text = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
        self._option(container, "--backend", self.backend, f"runtime: {text}", choices=self.backends)
        engines = "with --backend openvino: the build folder inside the export (default: openvino)"
        self._option(container, "--engines", self.engines, engines)
        self._option(container, "--threads", self.threads, f"intra-op threads (0: {self.threads_zero})", type=int)

    def parse(self, args: argparse.Namespace) -> argparse.Namespace:
        if self._given(args, "threads"):
            limits.check_threads(args.threads, "--threads", THREADS_WHY)
        both = "engines" in self.defaults and "backend" in self.defaults
        if both and args.engines != self.defaults["engines"] and args.backend != "openvino":
            raise UsageError(ENGINES_MISPLACED)
        return args


class OutputArgs(ArgGroup):
    """``--out`` and ``--force``: where a tool writes, and the consent to replace an earlier output of ours.

    Nothing to check at parse time: the paths are checked by :mod:`.files`, where the tool knows what it reads.
    """

    title = "output"
    flags = ("--out", "--force")
    FORCE_FOLDER = "replace --out if it is a previous output of tgate-trt (never other folders)"

    def __init__(
        self,
        *,
        out: Default = ABSENT,
        required: bool = False,
        out_help: str = "",
        force: str | None = None,
        context: str | None = None,
    ) -> None:
        super().__init__(context)
        self.out, self.required, self.out_help, self.force = out, required, out_help, force

    @classmethod
    def report(cls, folder: Path, files: tuple[str, ...]) -> OutputArgs:
        """A report tool's: a folder for ``files``, of which ``--force`` replaces only those."""
        names = ", ".join(files)
        force = f"replace the {names} of an earlier run (nothing else in --out)"
        return cls(out=folder, out_help=f"folder for {names}", force=force)

    @classmethod
    def folder(cls, out_help: str) -> OutputArgs:
        """A required output folder, written atomically, that ``--force`` replaces when it is ours."""
        return cls(out=None, required=True, out_help=out_help, force=cls.FORCE_FOLDER)

    def _add(self, container: Container) -> None:
        extra: dict[str, Any] = {"required": True} if self.required else {}
        self._option(container, "--out", self.out, self.out_help, type=Path, **extra)
        if self.force is not None:
            self._option(container, "--force", False, self.force, action="store_true")


GROUPS: tuple[type[ArgGroup], ...] = (SamplingArgs, SizeArgs, ScheduleArgs, BackendArgs, OutputArgs)


def parse(args: argparse.Namespace, *groups: ArgGroup) -> argparse.Namespace:
    """Check ``args`` against each group in turn: the first bad value is the one-line error."""
    for group in groups:
        group.parse(args)
    return args

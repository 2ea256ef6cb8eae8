"""Build options, and the exact builder configuration they turn into.

``builder_settings`` is pure (plain data, no TensorRT), so tests can assert what reaches the builder
for each option; ``apply_settings`` is the one place that maps that data onto the TensorRT API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import manifest as mf
from ..contract.errors import UsageError
from .profiles import RANGE_KEYS

HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS"}
MAX_OPT_LEVEL = 5
GIB = 1 << 30


@dataclass
class BuildOptions:
    """What a user asks of ``tgate-build``; invalid combinations raise ValueError saying what to do."""

    fp16: bool = False
    strongly_typed: bool | None = None  # None: auto, on exactly when the export is fp16
    timing_cache: Path | None = None
    optimization_level: int = 3  # TensorRT's default
    workspace_gib: float | None = None
    hardware_compat: str = "none"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    strip_weights: bool = False
    dynamic: dict[str, tuple[int, int]] = field(default_factory=dict)  # empty: static shapes

    def __post_init__(self) -> None:
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)
        level = self.optimization_level
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= MAX_OPT_LEVEL:
            raise UsageError(
                f"optimization level must be an integer 0..{MAX_OPT_LEVEL} (3 is TensorRT's default; higher "
                f"builds longer for possibly faster engines), got {level!r}"
            )
        if self.workspace_gib is not None and not 0 < self.workspace_gib < float("inf"):
            raise UsageError(
                f"workspace must be a positive number of GiB, got {self.workspace_gib!r}; "
                "leave it out to let TensorRT use all free device memory"
            )
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise UsageError(
                f"hardware compatibility must be one of {', '.join(HARDWARE_COMPAT)}, got {self.hardware_compat!r}"
            )
        if self.exclude_lean_runtime and not self.version_compatible:
            raise UsageError(
                "excluding the lean runtime only applies to version-compatible plans: add --version-compatible"
            )
        self.dynamic = dict(self.dynamic)
        for key, value in self.dynamic.items():
            if key not in RANGE_KEYS:
                raise UsageError(f"dynamic ranges are for {', '.join(RANGE_KEYS)}, got {key!r}")
            lo, hi = value
            if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or lo > hi:
                raise UsageError(f"dynamic {key} must be MIN:MAX with 1 <= MIN <= MAX, got {lo}:{hi}")
            self.dynamic[key] = (lo, hi)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the manifest's ``engines`` section."""
        data = asdict(self)
        data["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        data["dynamic"] = {k: list(v) for k, v in self.dynamic.items()}
        return data


@dataclass(frozen=True)
class BuilderSettings:
    """Everything handed to TensorRT, as names and numbers (see ``apply_settings``)."""

    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]  # BuilderFlag names
    memory_pool_limits: dict[str, int]  # MemoryPoolType name -> bytes
    hardware_compatibility_level: str  # HardwareCompatibilityLevel name
    builder_optimization_level: int
    engine_host_code_allowed: bool  # runtime flag needed to load version-compatible plans
    timing_cache: str | None
    refit_from_onnx: bool  # plans carry no weights: refit them from the ONNX at load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def builder_settings(options: BuildOptions, manifest: mf.Manifest) -> BuilderSettings:
    """Turn options into builder configuration, resolving precision against the export's dtype.

    fp16 ONNX exports build strongly typed (TensorRT keeps the graph's types, as NVIDIA's demo does);
    fp32 exports with ``fp16`` use the FP16 builder flag, which a strongly typed network refuses.
    """
    fp16_export = manifest.dtype == "fp16"
    strongly_typed = fp16_export if options.strongly_typed is None else options.strongly_typed
    if strongly_typed and options.fp16 and not fp16_export:
        raise UsageError(
            "a strongly typed network keeps the export's fp32 types, so --fp16 would have no effect: drop "
            "--strongly-typed to build fp16 with the FP16 flag, or re-export with --dtype fp16"
        )
    network_flags = ("STRONGLY_TYPED",) if strongly_typed else ()
    flags: list[str] = []
    if options.fp16 and not strongly_typed:
        flags.append("FP16")
    if options.version_compatible:
        flags.append("VERSION_COMPATIBLE")
        if options.exclude_lean_runtime:
            flags.append("EXCLUDE_LEAN_RUNTIME")
    if options.strip_weights:
        flags += ["STRIP_PLAN", "REFIT_IDENTICAL"]
    pools = {} if options.workspace_gib is None else {"WORKSPACE": int(options.workspace_gib * GIB)}
    return BuilderSettings(
        network_flags=network_flags,
        builder_flags=tuple(flags),
        memory_pool_limits=pools,
        hardware_compatibility_level=HARDWARE_COMPAT[options.hardware_compat],
        builder_optimization_level=options.optimization_level,
        engine_host_code_allowed=options.version_compatible,
        timing_cache=str(options.timing_cache) if options.timing_cache else None,
        refit_from_onnx=options.strip_weights,
    )


def network_creation_flags(trt: Any, settings: BuilderSettings) -> int:
    """Bit mask for ``builder.create_network``."""
    mask = 0
    for name in settings.network_flags:
        mask |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    return mask


def apply_settings(trt: Any, builder: Any, config: Any, settings: BuilderSettings) -> Any:
    """Configure ``config`` from ``settings`` and return a network created with its creation flags.

    The timing cache file, if it exists, is loaded here; ``save_timing_cache`` writes it back after the
    build so the next graph (and the next build) starts from it.
    """
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for pool, size in settings.memory_pool_limits.items():
        config.set_memory_pool_limit(getattr(trt.MemoryPoolType, pool), size)
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, settings.hardware_compatibility_level)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.timing_cache is not None:
        path = Path(settings.timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, False)  # a mismatching cache (other GPU/TRT) is reported, not used
    return builder.create_network(network_creation_flags(trt, settings))


def save_timing_cache(config: Any, settings: BuilderSettings) -> None:
    """Write the (grown) timing cache atomically."""
    if settings.timing_cache is None:
        return
    path = Path(settings.timing_cache)
    data = bytes(config.get_timing_cache().serialize())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_range(text: str) -> tuple[str, tuple[int, int]]:
    """``batch=1:4`` -> ``("batch", (1, 4))``, for the CLI's ``--dynamic``."""
    key, sep, span = text.partition("=")
    lo, colon, hi = span.partition(":")
    if not sep or not colon or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise UsageError(f"--dynamic takes NAME=MIN:MAX with NAME one of {', '.join(RANGE_KEYS)}, got {text!r}")
    return key.strip(), (int(lo), int(hi))


def options_from_mapping(data: Mapping[str, Any]) -> BuildOptions:
    """Inverse of ``BuildOptions.to_dict`` (reading a manifest's ``engines`` section)."""
    data = dict(data)
    data["dynamic"] = {k: tuple(v) for k, v in data.get("dynamic", {}).items()}
    return BuildOptions(**data)

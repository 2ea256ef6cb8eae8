"""OpenVINO backend of the runtime's :class:`Engine` interface: a compiled model and infer request per graph.

The tensors a call returns are the infer request's own ``ov.Tensor`` outputs. Bound as another request's
input (``set_tensor``) an ``ov.Tensor`` is shared, not copied, so the pre-gate graph's caches reach the
post-gate graph without a copy. Compiled models go to a cache directory (OpenVINO's ``CACHE_DIR``), so a
second start maps the compiled blob instead of compiling again.

A build that holds its weights once (``weights.bin``, :mod:`tgate_trt.engines.openvino_shared`) is mapped
once, and every graph's weights are views of that mapping. Its UNet variants, when they share enough weights
to matter, are compiled together as one model (:mod:`.ov_variants`), so the CPU plugin repacks each weight
once instead of once per variant; each variant keeps its own engine and infer request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import manifest as mf
from ..engines.openvino import OV_DIR, TARGET, compile_config, import_openvino
from ..engines.openvino_shared import map_weights, pages_released, read_bound
from .ov_variants import COMBINE_MIN_BYTES, SELECT, VariantGroup

CACHE_ENV = "TGATE_OV_CACHE"


class OvMismatch(mf.ManifestError):
    """The IR was built by another OpenVINO, for another device, or changed since the build."""


def default_cache_dir() -> Path:
    """``$TGATE_OV_CACHE``, else ``$XDG_CACHE_HOME/tgate-trt/openvino`` (``~/.cache`` by default).

    Outside the export on purpose: an export's files are all under sha256, and a Triton copy of it may be
    read-only.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tgate-trt" / "openvino"


def find_section(root: Path, manifest: mf.Manifest, name: str) -> dict[str, Any]:
    section = manifest.extra.get("engines", {}).get(name)
    if not isinstance(section, dict) or section.get("target") != TARGET:
        raise mf.ManifestError(
            f"{root} has no OpenVINO build named {name!r}: run tgate-build {root} --target openvino"
            + ("" if name == OV_DIR else f" --out {root / name}")
        )
    return section


def check_section(section: Mapping[str, Any], *, ov_version: str, device: str) -> None:
    """Refuse IR built by another OpenVINO or for another device (precision and validation are per device)."""
    built = str(section.get("openvino"))
    if built != ov_version:
        raise OvMismatch(
            f"this OpenVINO build was made with OpenVINO {built}, this is OpenVINO {ov_version}: rebuild it here "
            "with tgate-build --target openvino"
        )
    if section.get("device") != device:
        raise OvMismatch(
            f"this OpenVINO build was made and validated for {section.get('device')}, not {device}: rebuild it "
            f"with tgate-build --target openvino --device {device}"
        )


def verify_files(root: Path, section: Mapping[str, Any]) -> None:
    """Every ``.xml`` and ``.bin`` (and the shared ``weights.bin``) against its sha256; the message names the file."""
    remedy = "rebuild with tgate-build --target openvino"
    for graph in section["graphs"].values():
        mf.check_files(root, graph["files"], remedy, OvMismatch)
    if "weights" in section:
        mf.check_files(root, {section["weights"]["file"]: section["weights"]["sha256"]}, remedy, OvMismatch)


class OvEngine:
    """A compiled OpenVINO model behind the :class:`Engine` protocol (inputs and outputs: ``ov.Tensor``).

    ``static``: the graph is compiled for the exact input shapes of the first call (and again when they
    change), as optimum-intel's ``reshape`` does; OpenVINO's CPU plugin then plans memory and picks
    kernels once, measured ~6% faster per SD-1.5 UNet call than the dynamic graph. With a compile cache a
    shape seen before loads in about a second. ``weights``: the build's mapped ``weights.bin`` (None for a
    build whose IRs hold their own). ``group``: the variants compiled together that this graph is one of;
    the engine then runs the group's compiled model with its own request, selecting its body.
    """

    def __init__(
        self,
        name: str,
        spec: mf.GraphSpec,
        core: Any,
        xml: Path,
        device: str,
        config: dict[str, str],
        static: bool = True,
        weights: np.ndarray | None = None,
        group: VariantGroup | None = None,
    ) -> None:
        import openvino as ov

        self._ov, self.name, self.spec = ov, name, spec
        self._core, self._device, self._config = core, device, config
        self.dtypes = {t.name: np.dtype(t.dtype) for t in [*spec.inputs, *spec.outputs]}
        self.output_names = [o.name for o in spec.outputs]
        self.calls, self.seconds = 0, 0.0
        self.shapes: dict[str, tuple[int, ...]] | None = None  # what the compiled model was compiled for
        self.xml, self.static, self.weights, self.group = xml, static, weights, group  # weights: kept mapped
        self.inputs = {t.name: t.name for t in spec.inputs}  # input/output name -> port of the compiled model
        self.outputs = {n: n for n in self.output_names}
        self._epoch = 0  # the group compile this engine's request belongs to
        self._dummies: dict[str, Any] | None = None  # the zero inputs set on that request
        self.compiled: Any = None
        self.request: Any = None
        if group is not None:
            group.members.append(self)
        if group is None and not static:
            with pages_released(weights):
                self.compiled = core.compile_model(read_bound(core, xml, weights), device, config)
            self.request = self.compiled.create_infer_request()

    @property
    def loaded_from_cache(self) -> bool:
        return self.compiled is not None and bool(self.compiled.get_property("LOADED_FROM_CACHE"))

    def _compile_for(self, feeds: Mapping[str, Any]) -> None:
        """Compile for these input shapes unless already; the IR is read anew (memory-mapped) and dropped
        after compiling, so its fp32 weights are not held beside the compiled ones."""
        if self.group is not None:
            return self._join_group(feeds)
        shapes = {name: tuple(int(d) for d in value.shape) for name, value in feeds.items()}
        if not self.static or shapes == self.shapes:
            return None
        self.compiled, self.request = None, None  # free the old compiled weights before building the new
        model = read_bound(self._core, self.xml, self.weights)
        model.reshape({name: self._ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        with pages_released(self.weights):
            self.compiled = self._core.compile_model(model, self._device, self._config)
        del model
        self.request, self.shapes = self.compiled.create_infer_request(), shapes
        return None

    def _join_group(self, feeds: Mapping[str, Any]) -> None:
        """The group's compiled model for these shapes; a new one gets a new request, and every request
        gets zeros for the inputs only other variants read (their body does not run)."""
        assert self.group is not None
        epoch, dummies = self.group.prepare(self.name, feeds)
        if epoch != self._epoch or self.request is None:
            self.compiled, self._epoch = self.group.compiled, epoch
            self.request = self.compiled.create_infer_request()
            self.inputs, self.outputs = self.group.ports(self.name)
            self.request.set_tensor(SELECT, self.group.selector(self.name))
            self._dummies = None
        if self._dummies is not dummies:
            for port, tensor in dummies.items():
                self.request.set_tensor(port, tensor)
            self._dummies = dummies
        self.shapes = {name: tuple(int(d) for d in value.shape) for name, value in feeds.items()}

    def release(self) -> None:
        """Drop the compiled model and request (the group does, before it compiles for new shapes)."""
        self.compiled, self.request, self._dummies = None, None, None

    def asarray(self, array: np.ndarray, name: str | None = None) -> Any:
        """A tensor that owns a copy of ``array`` (host inputs are small: latents, states, scalars)."""
        if name is not None:
            array = array.astype(self.dtypes[name], copy=False)
        return self._ov.Tensor(np.ascontiguousarray(array), shared_memory=False)

    def numpy(self, value: Any) -> np.ndarray:
        """A host copy: the request reuses its output memory on the next call."""
        return np.array(value.data, copy=True)

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        self._compile_for(feeds)
        request = self.request
        assert request is not None
        for name, value in feeds.items():
            tensor = self.asarray(value, name) if isinstance(value, np.ndarray) else value
            request.set_tensor(self.inputs[name], tensor)
        request.infer()
        outputs = {name: request.get_tensor(self.outputs[name]) for name in self.output_names}
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return outputs


def _group_for(
    manifest: mf.Manifest,
    section: Mapping[str, Any],
    configs: dict[str, dict[str, str]],
    device: str,
    share: bool | None,
) -> list[str]:
    """The variants to compile together: all of them, if they share weights (``share`` True), if their
    smallest references :data:`COMBINE_MIN_BYTES` of them (``share`` None), and if they compile alike on
    the CPU (whose plugin the combination is measured and made for)."""
    keys = [k for k in manifest.variants if k in section["graphs"]]
    if share is False or len(keys) < 2:
        return []
    why = ""
    if device != "CPU":
        why = f"variants are combined on the CPU only, not on {device}"
    elif "weights" not in section:
        why = "this build holds a copy of the weights per graph (built before weights.bin)"
    elif len({tuple(sorted(configs[k].items())) for k in keys}) > 1:
        why = "its UNet variants compile with different settings"
    if why:
        if share:
            raise OvMismatch(f"the UNet variants can't share their weights: {why}; rebuild with tgate-build")
        return []
    smallest = min(int(section["graphs"][k].get("weights_bytes", 0)) for k in keys)
    return keys if share or smallest >= COMBINE_MIN_BYTES else []


def load_engines(
    root: Path,
    manifest: mf.Manifest,
    name: str = OV_DIR,
    device: str | None = None,
    threads: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    static: bool = True,
    share: bool | None = None,
) -> dict[str, OvEngine]:
    """Every graph of the build ``root/<name>``, checked (version, device, sha256) before compiling.

    ``cache_dir``: where compiled blobs are kept (default :func:`default_cache_dir`; ``""`` disables).
    ``static``: compile each graph for the shapes of its first call (see :class:`OvEngine`); False
    compiles the dynamic graphs now, for callers that change sizes often. ``share``: compile the UNet
    variants together so their weights are held once (True), each alone (False), or together when each
    references at least :data:`~.ov_variants.COMBINE_MIN_BYTES` of shared weights (None: below that the
    copies cost less than the compile cache, which a combined model does without).
    """
    section = find_section(root, manifest, name)
    ov = import_openvino()
    device = device or str(section["device"])
    check_section(section, ov_version=ov.get_version(), device=device)
    core = ov.Core()
    seen = [d.split(".")[0] for d in core.available_devices]
    if device not in seen:
        raise OvMismatch(
            f"this OpenVINO build was made for {device}, which OpenVINO does not see here (it has "
            f"{', '.join(seen)}): rebuild it with tgate-build --target openvino --device {seen[0]}"
        )
    verify_files(root, section)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir) if cache_dir else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache)})
    missing = [key for key in manifest.graphs if key not in section["graphs"]]
    if missing:
        raise OvMismatch(f"the OpenVINO build {name!r} has no {missing[0]}: rebuild with tgate-build --target openvino")
    weights = map_weights(root / section["weights"]["file"]) if "weights" in section else None
    threads = threads or int(section["options"].get("threads", 0))
    configs = {key: compile_config(g["inference"], device, threads) for key, g in section["graphs"].items()}
    xmls = {key: root / g["xml"] for key, g in section["graphs"].items()}
    together = _group_for(manifest, section, configs, device, share)
    group = None
    if together:
        group = VariantGroup(manifest, together, core, xmls, weights, device, configs[together[0]], static)
    return {
        key: OvEngine(
            key, spec, core, xmls[key], device, configs[key], static, weights, group if key in together else None
        )
        for key, spec in manifest.graphs.items()
    }

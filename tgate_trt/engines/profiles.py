"""TensorRT optimization profiles derived from the manifest alone.

Every symbolic dimension of every graph input is mapped to a number from (batch, height, width), so a
profile can never disagree with the exported graphs. Static profiles (min == opt == max) are the default:
CUDA graphs need them, and TensorRT picks its fastest kernels for exactly one shape.

Every graph the manifest lists gets a profile (text encoders, every UNet variant of the schedule, VAE);
nothing here knows a graph's name except the text encoders' batch rule. The dimensions are ``batch``
(``batch_size`` in optimum's graphs), ``cfg_batch`` (2 x batch: both CFG branches, the self-attention caches
a CFG variant outputs or replays), the latent size and the cache token counts ``hw_xN``; with a dynamic
batch range, ``cfg_batch`` spans ``2 * min .. 2 * max``. :func:`handoffs` lists which variant's cache
outputs feed which variant's inputs, and :func:`check_handoffs` proves from the manifest alone that each
producer's output shapes are exactly what the consumer's profile accepts, at min, opt and max.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .. import manifest as mf
from ..contract.errors import UsageError
from ..methods.plan import FULL, MEAN
from ..methods.variants import GraphVariant

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
RANGE_KEYS = ("batch", "height", "width")

# optimum's names for the text encoder / VAE decoder graphs
BATCH_SIZE = "batch_size"
SEQUENCE_LENGTH = "sequence_length"
HW_PREFIX = "hw_x"
_EXPR = re.compile(r"\s*(\w+)\s*(\*|//)\s*(\d+)\s*")


TEXT_ENCODER_KEYS = (mf.TEXT_ENCODER, mf.TEXT_ENCODER_2)


def graph_batch(graph_key: str, batch: int, manifest: mf.Manifest | None = None) -> int:
    """Batch the graph runs at: text encoders encode prompts and negatives together (2B) with CFG,
    prompts alone (B) for guidance-free families (read from the manifest)."""
    if graph_key not in TEXT_ENCODER_KEYS:
        return batch
    return manifest.encoder_batch(batch) if manifest is not None else 2 * batch


def dim_value(manifest: mf.Manifest, graph_key: str, dim: int | str, batch: int, lat_h: int, lat_w: int) -> int:
    """The number a (possibly symbolic) dimension takes for one batch and latent size."""
    if isinstance(dim, int):
        return dim
    if dim in (mf.BATCH, BATCH_SIZE):
        return graph_batch(graph_key, batch, manifest)
    if dim == mf.CFG_BATCH:  # both CFG branches of a CFG variant (its self-attention caches)
        return 2 * batch
    if dim == SEQUENCE_LENGTH:
        return int(manifest.text["max_length"])
    if dim == mf.LATENT_H:
        return lat_h
    if dim == mf.LATENT_W:
        return lat_w
    expr = _EXPR.fullmatch(dim)
    if expr:  # optimum writes derived output dims such as "latent_height * 8"
        base = dim_value(manifest, graph_key, expr[1], batch, lat_h, lat_w)
        return base * int(expr[3]) if expr[2] == "*" else base // int(expr[3])
    if dim.startswith(HW_PREFIX) and dim[len(HW_PREFIX) :].isdigit():
        level = int(dim[len(HW_PREFIX) :])
        if level <= 0:
            raise UsageError(f"{graph_key}: dimension {dim!r} has a non-positive level")
        return (lat_h // level) * (lat_w // level)
    raise UsageError(
        f"{graph_key}: the manifest uses a symbolic dimension {dim!r} that tgate-build does not know; "
        "re-export with this version of tgate-trt"
    )


def concrete_shape(
    manifest: mf.Manifest, graph_key: str, shape: list[int | str], batch: int, height: int, width: int
) -> Shape:
    """Shape of a tensor (from the manifest) at one batch and image size; bad sizes raise ValueError."""
    _check_batch(batch)
    lat_h, lat_w = manifest.latent_size(height, width)
    return tuple(dim_value(manifest, graph_key, d, batch, lat_h, lat_w) for d in shape)


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UsageError(f"batch must be an integer >= 1, got {batch!r}")


def _check_ranges(ranges: Mapping[str, tuple[int, int]], opt: Mapping[str, int]) -> None:
    unknown = sorted(set(ranges) - set(RANGE_KEYS))
    if unknown:
        raise UsageError(f"dynamic ranges are given for {', '.join(RANGE_KEYS)}; unknown: {', '.join(unknown)}")
    for key, (lo, hi) in ranges.items():
        if lo > hi:
            raise UsageError(f"dynamic {key} range {lo}:{hi} has min > max")
        if not lo <= opt[key] <= hi:
            raise UsageError(f"the optimal {key} {opt[key]} is outside its dynamic range {lo}:{hi}")


def _tensor_profiles(
    manifest: mf.Manifest,
    graph_key: str,
    tensors: list[mf.TensorSpec],
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None,
) -> Profile:
    if graph_key not in manifest.graphs:
        raise UsageError(f"the export has no graph {graph_key!r}; it has {', '.join(manifest.graphs)}")
    opt = {"batch": batch, "height": height, "width": width}
    ranges = dict(ranges or {})
    _check_ranges(ranges, opt)
    lo = {k: ranges.get(k, (v, v))[0] for k, v in opt.items()}
    hi = {k: ranges.get(k, (v, v))[1] for k, v in opt.items()}
    shapes = [
        {t.name: concrete_shape(manifest, graph_key, t.shape, p["batch"], p["height"], p["width"]) for t in tensors}
        for p in (lo, opt, hi)
    ]
    return {t.name: (shapes[0][t.name], shapes[1][t.name], shapes[2][t.name]) for t in tensors}


def profiles_for(
    manifest: mf.Manifest,
    graph_key: str,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> Profile:
    """``{input: (min, opt, max)}`` for every input of ``graph_key``.

    ``batch``/``height``/``width`` give the optimal (and, without ``ranges``, the only) shape; ``ranges``
    maps any of ``batch``, ``height``, ``width`` to an inclusive ``(min, max)``. Sizes the export cannot
    take raise ValueError with the rule (``Manifest.latent_size``).
    """
    spec = manifest.graphs.get(graph_key)
    return _tensor_profiles(manifest, graph_key, spec.inputs if spec else [], batch, height, width, ranges)


def output_shapes(
    manifest: mf.Manifest,
    graph_key: str,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> Profile:
    """``{output: (min, opt, max)}``: what ``graph_key`` produces at the corners of its profile."""
    spec = manifest.graphs.get(graph_key)
    return _tensor_profiles(manifest, graph_key, spec.outputs if spec else [], batch, height, width, ranges)


def all_profiles(
    manifest: mf.Manifest,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    graphs: tuple[str, ...] | None = None,
) -> dict[str, Profile]:
    """Profiles for every graph, computed before any build so a bad size fails before work starts."""
    return {key: profiles_for(manifest, key, batch, height, width, ranges) for key in graphs or tuple(manifest.graphs)}


@dataclass(frozen=True)
class Handoff:
    """The ``kind`` caches ``source`` outputs that ``target`` may replay (tensor names of ``kind``)."""

    source: str
    target: str
    kind: str
    names: tuple[str, ...]


def manifest_variants(manifest: mf.Manifest) -> list[GraphVariant]:
    """The UNet graph variants the manifest declares (V1: pre/post-gate; V2: five graphs)."""
    return [GraphVariant.from_dict(key, data) for key, data in manifest.variants.items()]


def can_replay(source: GraphVariant, target: GraphVariant, kind: str) -> bool:
    """Whether ``target`` can replay the ``kind`` caches ``source`` captures: the whole batch between graphs
    with the same CFG setting (``full``), or the mean of the CFG halves into a graph without CFG (``mean``)."""
    layout = dict(source.capture).get(kind)
    if kind not in target.replay or kind in source.replay:
        return False
    return (layout == FULL and source.cfg == target.cfg) or (layout == MEAN and not target.cfg)


def handoffs(manifest: mf.Manifest) -> list[Handoff]:
    """Every (capturing variant, replaying variant, kind) the sampler may connect: each is a zero-copy
    hand-off of device buffers at run time, so each producer's outputs must fit its consumer's profile.
    A superset of what one plan uses (which pairs occur depends on ``sp``/``fi_interval`` and ``warm_up``)."""
    variants, sites = manifest_variants(manifest), manifest.sites
    return [
        Handoff(s.key, t.key, kind, tuple(sites[kind]))
        for t in variants
        for kind in sorted(t.replay)
        for s in variants
        if can_replay(s, t, kind)
    ]


def check_handoffs(
    manifest: mf.Manifest,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    graphs: tuple[str, ...] | None = None,
) -> list[Handoff]:
    """Every cache a variant replays has a producer, and the producer's (min, opt, max) output shapes are the
    consumer's profile exactly; raises ``ManifestError`` naming the tensor otherwise. Only pairs whose two
    graphs are among ``graphs`` (default: all) are compared. Returns the hand-offs checked."""
    keys = set(graphs or manifest.graphs)
    pairs = handoffs(manifest)
    for variant in manifest_variants(manifest):
        for kind in sorted(variant.replay):
            if variant.key in keys and not any(h.target == variant.key and h.kind == kind for h in pairs):
                raise mf.ManifestError(
                    f"{variant.key} replays {kind} caches that no variant of the export captures: re-export"
                )
    checked = [h for h in pairs if h.source in keys and h.target in keys]
    for h in checked:
        produced = output_shapes(manifest, h.source, batch, height, width, ranges)
        accepted = profiles_for(manifest, h.target, batch, height, width, ranges)
        for name in h.names:
            if name not in produced or name not in accepted:
                raise mf.ManifestError(
                    f"{h.source} -> {h.target}: cache tensor {name} is missing from "
                    f"{h.source if name not in produced else h.target}: re-export"
                )
            if produced[name] != accepted[name]:
                raise mf.ManifestError(
                    f"{h.source} outputs {name} with shapes {produced[name]} (min, opt, max), but {h.target} "
                    f"takes {accepted[name]}: the manifest's dimensions disagree; re-export"
                )
    return checked


def is_static(profile: Profile) -> bool:
    return all(mn == opt == mx for mn, opt, mx in profile.values())

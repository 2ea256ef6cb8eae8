"""TensorRT optimization profiles derived from the manifest alone.

Every symbolic dimension of every graph input is mapped to a number from (batch, height, width), so a
profile can never disagree with the exported graphs. Static profiles (min == opt == max) are the default:
CUDA graphs need them, and TensorRT picks its fastest kernels for exactly one shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .. import manifest as mf
from ..contract.errors import UsageError

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


def dim_value(
    manifest: mf.Manifest, graph_key: str, dim: int | str, batch: int, lat_h: int, lat_w: int
) -> int:
    """The number a (possibly symbolic) dimension takes for one batch and latent size."""
    if isinstance(dim, int):
        return dim
    if dim in (mf.BATCH, BATCH_SIZE):
        return graph_batch(graph_key, batch, manifest)
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
        raise UsageError(
            f"dynamic ranges are given for {', '.join(RANGE_KEYS)}; unknown: {', '.join(unknown)}"
        )
    for key, (lo, hi) in ranges.items():
        if lo > hi:
            raise UsageError(f"dynamic {key} range {lo}:{hi} has min > max")
        if not lo <= opt[key] <= hi:
            raise UsageError(f"the optimal {key} {opt[key]} is outside its dynamic range {lo}:{hi}")


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
    if graph_key not in manifest.graphs:
        raise UsageError(f"the export has no graph {graph_key!r}; it has {', '.join(manifest.graphs)}")
    opt = {"batch": batch, "height": height, "width": width}
    ranges = dict(ranges or {})
    _check_ranges(ranges, opt)
    lo = {k: ranges.get(k, (v, v))[0] for k, v in opt.items()}
    hi = {k: ranges.get(k, (v, v))[1] for k, v in opt.items()}
    spec = manifest.graphs[graph_key]
    shapes = [
        {
            t.name: concrete_shape(manifest, graph_key, t.shape, p["batch"], p["height"], p["width"])
            for t in spec.inputs
        }
        for p in (lo, opt, hi)
    ]
    return {t.name: (shapes[0][t.name], shapes[1][t.name], shapes[2][t.name]) for t in spec.inputs}


def all_profiles(
    manifest: mf.Manifest,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    graphs: tuple[str, ...] | None = None,
) -> dict[str, Profile]:
    """Profiles for every graph, computed before any build so a bad size fails before work starts."""
    return {
        key: profiles_for(manifest, key, batch, height, width, ranges)
        for key in graphs or tuple(manifest.graphs)
    }


def is_static(profile: Profile) -> bool:
    return all(mn == opt == mx for mn, opt, mx in profile.values())

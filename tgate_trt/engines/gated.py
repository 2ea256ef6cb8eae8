"""One UNet graph for every variant: what it takes and gives, its profiles, and each variant as a view of it.

Per-variant TensorRT plans each hold their own copy of the UNet weights on the GPU (V1: two, V2: five).
The gated graph ``unet_gated`` holds them once: it is the raw UNet call at batch ``N`` with, at every cache
site, an ONNX ``If`` on the boolean input ``replay.<kind>`` whose then-branch returns the cache input
``<site>`` and whose else-branch computes the attention (:mod:`.gated_onnx` builds it). Every site's value
is also an output ``<site>.out``. CFG is outside it: the batch of a CFG step (``N = 2B``) and of a step
without CFG (``N = B``) differ, and TensorRT's conditionals need both branches' outputs to have the same
shape, so no ``If`` can switch the batch; the engine has one optimization profile per batch instead.

A variant is then a *view*: which selectors it sets, how its inputs become the gated inputs (the CFG
duplication and ``[negative; prompt]`` concatenation, zeros for what it does not read) and how the gated
outputs become its outputs (guidance combination, the CFG mean of a capture). :func:`gated_feeds` and
:func:`variant_outputs` do that for any array type through :class:`ArrayOps` (numpy here and in the tests
against ONNX Runtime, torch in :mod:`.gated_views`), so the ONNX Runtime equivalence the tests check is
the very mapping the TensorRT runtime runs. Pure: no TensorRT, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from .. import manifest as mf
from ..contract.errors import UsageError
from ..methods.plan import FULL, MEAN
from ..methods.variants import GraphVariant
from .profiles import Profile, Shape, profiles_for

GATED_KEY = "unet_gated"
N = "unet_batch"  # the UNet call's batch: 2B in a CFG view, B otherwise
SAMPLE_IN, OUT = "unet.sample", "unet.out"
STATES_IN, TEXT_EMBEDS_IN, TIME_IDS_IN = "unet.encoder_hidden_states", "unet.text_embeds", "unet.time_ids"
# batch-N inputs: (negative, positive) inputs of a CFG variant, concatenated as the variant graph does
CFG_PAIRS = {
    SAMPLE_IN: (mf.SAMPLE, mf.SAMPLE),
    STATES_IN: (mf.NEGATIVE_PROMPT_EMBEDS, mf.PROMPT_EMBEDS),
    TEXT_EMBEDS_IN: (mf.NEGATIVE_TEXT_EMBEDS, mf.TEXT_EMBEDS),
    TIME_IDS_IN: (mf.NEGATIVE_TIME_IDS, mf.TIME_IDS),
}
_HW = re.compile(rf"{mf.hw_dim(0)[:-1]}(\d+)")


def selector(kind: str) -> str:
    """Boolean input: ``True`` replays ``kind`` at every site from the cache inputs."""
    return f"replay.{kind}"


def site_output(name: str) -> str:
    """The value of site ``name`` (computed or replayed) as an output, ``[N, HW, C]``."""
    return f"{name}.out"


@dataclass(frozen=True)
class GatedSpec:
    """The gated graph's contract, recorded in ``engines.json`` so the runtime needs no ONNX."""

    base: str  # the variant graph it is made from: computes every site, captures every kind
    cfg: bool  # the family uses CFG: its CFG views run the UNet at 2B
    inputs: tuple[mf.TensorSpec, ...]
    outputs: tuple[mf.TensorSpec, ...]
    sites: dict[str, list[str]]  # kind -> cache tensor names, in graph order
    layouts: dict[str, str]  # kind -> how ``base`` captures it (mean or full): how to find the site

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GatedSpec:
        tensors = {k: tuple(mf.TensorSpec(**t) for t in data[k]) for k in ("inputs", "outputs")}
        return cls(data["base"], bool(data["cfg"]), sites=dict(data["sites"]), layouts=dict(data["layouts"]), **tensors)

    def input(self, name: str) -> mf.TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def base_variant(manifest: mf.Manifest) -> GraphVariant:
    """The variant that replays nothing and captures every kind that has sites (V1 ``unet_pregate``, V2
    ``unet_gate``): its graph holds every computation any variant does."""
    kinds = {k for k, names in manifest.sites.items() if names}
    for key, data in manifest.variants.items():
        v = GraphVariant.from_dict(key, data)
        if not v.replay and {k for k, _ in v.capture} >= kinds and v.cfg == manifest.model.cfg:
            return v
    raise UsageError(
        f"the export's variants ({', '.join(manifest.variants)}) have none that computes and captures every "
        f"cache site ({', '.join(sorted(kinds))}): a gated UNet can't be made from it; build per-variant plans"
    )


def _batch_n(shape: Sequence[int | str]) -> list[int | str]:
    return [N, *shape[1:]]


def gated_spec(manifest: mf.Manifest) -> GatedSpec:
    """The gated graph's inputs and outputs, from the manifest alone (checked against the graph when it is
    made)."""
    base = base_variant(manifest)
    spec = manifest.graphs[base.key]
    have = {t.name: t for t in spec.inputs}
    cfg = manifest.model.cfg
    inputs: list[mf.TensorSpec] = []
    for gated, (neg, pos) in CFG_PAIRS.items():
        if pos in have and (not cfg or neg in have):
            inputs.append(mf.TensorSpec(gated, have[pos].dtype, _batch_n(have[pos].shape)))
        elif pos in have or neg in have:
            raise mf.ManifestError(f"{base.key} takes {pos if pos in have else neg} without its CFG pair: re-export")
    inputs.append(have[mf.TIMESTEP])
    if mf.GUIDANCE_SCALE in have and not cfg:  # a guidance embedding: the UNet reads it; with CFG only the combine
        inputs.append(have[mf.GUIDANCE_SCALE])
    dtype = have[mf.SAMPLE].dtype
    layers = {c.name: c for c in manifest.cache_layers}
    sites = {k: names for k, names in manifest.sites.items() if names}
    caches = [
        mf.TensorSpec(n, dtype, [N, mf.hw_dim(layers[n].level), layers[n].channels])
        for ns in sites.values()
        for n in ns
    ]
    inputs += [mf.TensorSpec(selector(k), "bool", []) for k in sites] + caches
    noise = spec.output(mf.NOISE_PRED)
    outputs = [mf.TensorSpec(OUT, noise.dtype, _batch_n(noise.shape))]
    outputs += [mf.TensorSpec(site_output(c.name), c.dtype, c.shape) for c in caches]
    return GatedSpec(base.key, cfg, tuple(inputs), tuple(outputs), sites, dict(base.capture))


def resolve(shape: Sequence[int | str], n: int, lat_h: int, lat_w: int) -> Shape:
    """A gated tensor's shape for a UNet batch ``n`` and latent size."""
    out: list[int] = []
    for dim in shape:
        if isinstance(dim, int):
            out.append(dim)
        elif dim == N:
            out.append(n)
        elif dim == mf.LATENT_H:
            out.append(lat_h)
        elif dim == mf.LATENT_W:
            out.append(lat_w)
        elif (m := _HW.fullmatch(dim)) is not None:
            level = int(m[1])
            out.append((lat_h // level) * (lat_w // level))
        else:
            raise mf.ManifestError(f"the gated UNet has a dimension {dim!r} it can't size: re-export")
    return tuple(out)


def profile_settings(manifest: mf.Manifest) -> list[bool]:
    """The CFG settings the views use, CFG first: optimization profile ``i`` runs the views with ``cfg ==
    profile_settings(...)[i]`` (profile 0 is the one TensorRT sizes the weights for)."""
    return sorted({bool(v["cfg"]) for v in manifest.variants.values()}, reverse=True)


def gated_profiles(
    manifest: mf.Manifest,
    spec: GatedSpec,
    batch: int,
    height: int,
    width: int,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> list[Profile]:
    """One optimization profile per CFG setting (:func:`profile_settings`): ``N = 2B`` for CFG views, ``B``
    for the others, over the same ``(min, opt, max)`` corners as the variant graphs' profiles."""
    corners = profiles_for(manifest, spec.base, batch, height, width, ranges)[mf.SAMPLE]
    profiles = []
    for cfg in profile_settings(manifest):
        k = 2 if cfg else 1
        lo, opt, hi = ((k * c[0], c[2], c[3]) for c in corners)
        profiles.append(
            {t.name: (resolve(t.shape, *lo), resolve(t.shape, *opt), resolve(t.shape, *hi)) for t in spec.inputs}
        )
    return profiles


# --- views -----------------------------------------------------------------------------------------------
T = TypeVar("T")


class ArrayOps(Protocol, Generic[T]):
    """The few array operations a view needs, for one array type."""

    def shape(self, x: T) -> tuple[int, ...]: ...

    def cat(self, a: T, b: T) -> T: ...

    def zeros(self, shape: Shape, dtype: str) -> T: ...

    def flag(self, value: bool) -> T: ...

    def mean_halves(self, x: T) -> T: ...

    def guide(self, x: T, scale: T) -> T: ...


def input_recipe(spec: GatedSpec, family: mf.ModelFamily, variant: GraphVariant) -> dict[str, tuple[str, ...]]:
    """How ``variant``'s inputs fill each gated input: ``("cat", neg, pos)`` (CFG), ``("same", name)``,
    ``("zeros",)`` (read by no branch the view takes), ``("flag", "1"|"0")``. The conditioning a variant
    without CFG takes is :func:`~tgate_trt.manifest.conditioning_inputs`'s: the negative branch's added
    conditioning after the gate of a CFG family, the prompt's otherwise."""
    names = set(mf.conditioning_inputs(family, cfg=variant.cfg, text=variant.reads_text)) | {mf.SAMPLE, mf.TIMESTEP}
    recipe: dict[str, tuple[str, ...]] = {}
    for t in spec.inputs:
        if t.name in CFG_PAIRS:
            neg, pos = CFG_PAIRS[t.name]
            if variant.cfg:
                recipe[t.name] = ("cat", neg, pos) if {neg, pos} <= names else ("zeros",)
            else:
                recipe[t.name] = next((("same", n) for n in (pos, neg) if n in names), ("zeros",))
        elif t.name.startswith("replay."):
            recipe[t.name] = ("flag", "1" if t.name.removeprefix("replay.") in variant.replay else "0")
        elif t.name in (mf.TIMESTEP, mf.GUIDANCE_SCALE):
            recipe[t.name] = ("same", t.name)
        else:  # a cache input
            kind = next(k for k, ns in spec.sites.items() if t.name in ns)
            recipe[t.name] = ("same", t.name) if kind in variant.replay else ("zeros",)
    return recipe


def output_recipe(spec: GatedSpec, variant: GraphVariant) -> dict[str, tuple[str, str]]:
    """How the gated outputs make ``variant``'s outputs: ``("guide", OUT)`` (CFG combination), ``("mean",
    <site>.out)`` (a CFG-mean capture), ``("same", x)``."""
    recipe = {mf.NOISE_PRED: ("guide" if variant.cfg else "same", OUT)}
    for kind, layout in variant.capture:
        op = "mean" if layout == MEAN else "same"
        if layout not in (MEAN, FULL) or (layout == MEAN and not variant.cfg):
            raise mf.ManifestError(f"{variant.key}: a {layout} capture without CFG can't be served: re-export")
        recipe.update({name: (op, site_output(name)) for name in spec.sites[kind]})
    return recipe


def kept_outputs(spec: GatedSpec, variant: GraphVariant) -> set[str]:
    """The gated outputs a view hands on as they are (its own buffers); every other output is scratch."""
    return {x for op, x in output_recipe(spec, variant).values() if op == "same"}


def gated_feeds(
    spec: GatedSpec, family: mf.ModelFamily, variant: GraphVariant, feeds: Mapping[str, T], ops: ArrayOps[T]
) -> dict[str, T]:
    """The gated engine's inputs for one call of ``variant`` with its own ``feeds``."""
    b, _, lat_h, lat_w = ops.shape(feeds[mf.SAMPLE])
    n = 2 * b if variant.cfg else b
    out: dict[str, T] = {}
    for name, (op, *args) in input_recipe(spec, family, variant).items():
        if op == "cat":
            out[name] = ops.cat(feeds[args[0]], feeds[args[1]])
        elif op == "same":
            out[name] = feeds[args[0]]
        elif op == "flag":
            out[name] = ops.flag(args[0] == "1")
        else:
            t = spec.input(name)
            out[name] = ops.zeros(resolve(t.shape, n, lat_h, lat_w), t.dtype)
    return out


def variant_outputs(
    spec: GatedSpec, variant: GraphVariant, outputs: Mapping[str, T], feeds: Mapping[str, T], ops: ArrayOps[T]
) -> dict[str, T]:
    """``variant``'s outputs from one gated call's ``outputs`` (``feeds``: the variant's, for the guidance
    scale)."""
    result: dict[str, T] = {}
    for name, (op, source) in output_recipe(spec, variant).items():
        x = outputs[source]
        if op == "guide":
            x = ops.guide(x, feeds[mf.GUIDANCE_SCALE])
        elif op == "mean":
            x = ops.mean_halves(x)
        result[name] = x
    return result


class NumpyOps:
    """:class:`ArrayOps` for numpy: the same arithmetic, in the same order, as the variant graphs."""

    def shape(self, x: np.ndarray) -> tuple[int, ...]:
        return tuple(x.shape)

    def cat(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b])

    def zeros(self, shape: Shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype=np.dtype(dtype))

    def flag(self, value: bool) -> np.ndarray:
        return np.array(value)

    def mean_halves(self, x: np.ndarray) -> np.ndarray:
        half = x.shape[0] // 2
        return (x[:half] + x[half:]) / x.dtype.type(2)

    def guide(self, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        half = x.shape[0] // 2
        uncond, text = x[:half], x[half:]
        return uncond + scale.astype(x.dtype) * (text - uncond)

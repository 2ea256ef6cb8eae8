"""T-GATE in PyTorch: an ``attn2`` processor and the two UNet halves that become the ONNX graphs.

The cache is an explicit tensor per layer, passed in and out of the UNet, never state kept on the
modules between calls; that is what lets the same code be exported as two graphs and serve
concurrent requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .. import manifest as mf
from ..contract.errors import UsageError
from ..families import detect_family, guidance_embedding
from ..methods.plan import KINDS, MEAN
from ..methods.variants import GraphVariant, cache_tensor, variants_for

Mode = Literal["compute", "capture", "replay"]


@dataclass
class GateState:
    """What every ``attn2`` processor of one UNet should do on the current call."""

    mode: Mode = "compute"
    cfg: bool = True  # capture averages the unconditional and conditional batch halves
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [B, HW, C]
    order: list[str] = field(default_factory=list)  # module names in the order they ran (capture)


class TGateAttnProcessor:
    """Compute cross-attention, compute and capture its CFG mean, or replay a captured cache.

    The captured value is the attention output after ``to_out`` and before the block's residual add,
    which for ``attn2`` in diffusers is exactly what the processor returns (checked at install time).
    """

    def __init__(self, name: str, state: GateState, base: Any | None = None) -> None:
        self.name = name
        self.state = state
        self.base = base or AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.state
        if state.mode == "replay":
            return state.cache[self.name]
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if state.mode == "capture":
            if state.cfg:
                uncond, text = out.chunk(2)
                state.cache[self.name] = (uncond + text) / 2
            else:
                state.cache[self.name] = out
            state.order.append(self.name)
        return out


def _module_sort_key(name: str) -> tuple[int, ...]:
    """UNet execution order: down blocks, mid block, up blocks, then numeric indices."""
    group = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[name.split(".")[0]]
    return (group, *map(int, re.findall(r"\d+", name)))


def attention_modules(unet: torch.nn.Module, kind: str = "attn2") -> list[str]:
    """Module paths of every ``attn1`` (self-) or ``attn2`` (cross-attention) in execution order."""
    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith(f".{kind}")]
    return sorted(names, key=_module_sort_key)


def cross_attention_modules(unet: torch.nn.Module) -> list[str]:
    """Module paths of every ``attn2`` in execution order (the cache order of the graphs)."""
    return attention_modules(unet, "attn2")


def _base_processor(proc: Any) -> Any:
    return proc.base if isinstance(proc, TGateAttnProcessor) else proc


def install_tgate(unet: Any, kind: str = "attn2") -> tuple[GateState, list[str]]:
    """Swap every ``kind`` (``attn2``, or ``attn1`` for T-GATE V2) processor for a :class:`TGateAttnProcessor`;
    idempotent.

    All processors of one kind share one :class:`GateState`, so the pre- and post-gate wrappers of
    the same UNet drive the same modules; returns the state and the module names in cache order.
    """
    names = attention_modules(unet, kind)
    processors = dict(unet.attn_processors)
    current = processors[f"{names[0]}.processor"] if names else None
    if isinstance(current, TGateAttnProcessor):
        return current.state, names
    modules = dict(unet.named_modules())
    for name in names:
        attn = modules[name]
        if attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise UsageError(f"{name}: attention with a residual inside the processor can't be gated")
    state = GateState()
    for name in names:
        processors[f"{name}.processor"] = TGateAttnProcessor(name, state, processors[f"{name}.processor"])
    unet.set_attn_processor(processors)
    return state, names


def remove_tgate(unet: Any) -> None:
    """Restore the processors that :func:`install_tgate` wrapped."""
    unet.set_attn_processor({k: _base_processor(v) for k, v in unet.attn_processors.items()})


def _bind(names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Positional (as the ONNX exporter calls) or keyword inputs -> one dict by graph input name."""
    if len(args) > len(names):
        raise UsageError(f"expected at most {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            raise TypeError(f"unexpected or repeated input {key!r}; inputs are {', '.join(names)}")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise UsageError(f"missing input(s) {', '.join(missing)}")
    return bound


class VariantUNet(torch.nn.Module):
    """The UNet as one graph variant: CFG inside or not, each attention kind computed, captured (as an
    output: the CFG mean or the whole batch) or replayed (from an input), per the variant's declaration.

    CFG lives in the graph so every variant shares one interface (latents ``[B, 4, h, w]`` in, noise
    prediction ``[B, 4, h, w]`` out), the cache mean needs the CFG batch layout anyway, and an engine runs
    the duplication and guidance without host round trips. A variant whose attn2 replays reads no text
    states (a 1-token placeholder satisfies the UNet's signature and is dead code in the graph); SDXL's
    added conditioning and LCM's guidance embedding still feed the time embedding, so they stay inputs.
    """

    def __init__(self, unet: Any, variant: GraphVariant, family: mf.ModelFamily) -> None:
        super().__init__()
        self.unet, self.variant, self.family = unet, variant, family
        # every kind gets its processors: variants share the UNet, so each call sets every kind's mode
        self.kinds = {kind: install_tgate(unet, kind) for kind in KINDS}  # kind -> (state, module names)
        self.conditioning = mf.conditioning_inputs(self.family, cfg=variant.cfg, text=variant.reads_text)
        self.cross_dim = unet.config.cross_attention_dim

    @property
    def names(self) -> list[str]:
        """attn2 module paths in cache order (V1's cache layers)."""
        return self.kinds["attn2"][1]

    def cache_inputs(self) -> list[str]:
        return [cache_tensor(k, i) for k in KINDS if k in self.variant.replay for i in range(len(self.kinds[k][1]))]

    def cache_outputs(self) -> list[str]:
        return [cache_tensor(k, i) for k, _ in self.variant.capture for i in range(len(self.kinds[k][1]))]

    @property
    def input_names(self) -> list[str]:
        return [mf.SAMPLE, mf.TIMESTEP, *self.conditioning, *self.cache_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [mf.NOISE_PRED, *self.cache_outputs()]

    def _extra(self, x: dict[str, torch.Tensor], batch: int, dtype: torch.dtype) -> dict[str, Any]:
        """``timestep_cond`` (LCM's guidance embedding) and ``added_cond_kwargs`` (SDXL), or nothing."""
        extra: dict[str, Any] = {}
        if self.family.guidance_embedding is not None:
            extra["timestep_cond"] = guidance_embedding(
                x[mf.GUIDANCE_SCALE], batch, self.family.guidance_embedding, dtype
            )
        if self.family.added_conditioning:
            if self.variant.cfg:  # both branches, negative first as the latents and states are
                embeds = torch.cat([x[mf.NEGATIVE_TEXT_EMBEDS], x[mf.TEXT_EMBEDS]])
                ids = torch.cat([x[mf.NEGATIVE_TIME_IDS], x[mf.TIME_IDS]])
            elif self.family.cfg:  # after the gate: the negative branch's, as the authors
                embeds, ids = x[mf.NEGATIVE_TEXT_EMBEDS], x[mf.NEGATIVE_TIME_IDS]
            else:
                embeds, ids = x[mf.TEXT_EMBEDS], x[mf.TIME_IDS]
            extra["added_cond_kwargs"] = {"text_embeds": embeds, "time_ids": ids}
        return extra

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        if len(args) + len(kwargs) != len(self.input_names):
            raise UsageError(
                f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                f"got {len(args) + len(kwargs)}"
            )
        x = _bind(self.input_names, args, kwargs)
        cfg, captures = self.variant.cfg, dict(self.variant.capture)
        for kind, (state, names) in self.kinds.items():
            state.cache, state.order = {}, []
            if kind in self.variant.replay:
                state.mode = "replay"
                state.cache = {n: x[cache_tensor(kind, i)] for i, n in enumerate(names)}
            elif kind in captures:
                state.mode, state.cfg = "capture", captures[kind] == MEAN
            else:
                state.mode = "compute"
        sample = x[mf.SAMPLE]
        latents = torch.cat([sample, sample]) if cfg else sample
        if not self.variant.reads_text:
            states = latents.new_zeros(latents.shape[0], 1, self.cross_dim)
        elif cfg:
            states = torch.cat([x[mf.NEGATIVE_PROMPT_EMBEDS], x[mf.PROMPT_EMBEDS]])
        else:
            states = x[mf.PROMPT_EMBEDS]
        extra = self._extra(x, sample.shape[0], sample.dtype)
        out = self.unet(latents, x[mf.TIMESTEP], encoder_hidden_states=states, return_dict=False, **extra)[0]
        if cfg:
            uncond, text = out.chunk(2)
            scale = x[mf.GUIDANCE_SCALE].to(out.dtype)
            out = uncond + scale * (text - uncond)
        caches = [self.kinds[k][0].cache[n] for k, _ in self.variant.capture for n in self.kinds[k][1]]
        for state, _ in self.kinds.values():
            state.cache = {}
        return (out, *caches) if caches else out


class PreGateUNet(VariantUNet):
    """V1's graph for steps before the gate: every attn2 output (CFG mean, or as-is without CFG) is an output.
    ``family`` defaults to what the UNet's config alone says (:func:`~tgate_trt.families.detect_family`)."""

    def __init__(self, unet: Any, family: mf.ModelFamily | None = None) -> None:
        family = family or detect_family(unet)
        super().__init__(unet, variants_for("v1", family.cfg)[0], family)


class PostGateUNet(VariantUNet):
    """V1's graph for steps after the gate: no text states, every attn2 replays its cache, batch ``B``."""

    def __init__(self, unet: Any, family: mf.ModelFamily | None = None) -> None:
        family = family or detect_family(unet)
        super().__init__(unet, variants_for("v1", family.cfg)[1], family)

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


def cross_attention_modules(unet: torch.nn.Module) -> list[str]:
    """Module paths of every ``attn2`` in execution order (the cache order of the graphs)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith(".attn2")]
    return sorted(names, key=_module_sort_key)


def _base_processor(proc: Any) -> Any:
    return proc.base if isinstance(proc, TGateAttnProcessor) else proc


def install_tgate(unet: Any) -> tuple[GateState, list[str]]:
    """Swap every ``attn2`` processor for a :class:`TGateAttnProcessor`; idempotent.

    All processors of one UNet share one :class:`GateState`, so the pre- and post-gate wrappers of
    the same UNet drive the same modules; returns the state and the attn2 names in cache order.
    """
    names = cross_attention_modules(unet)
    processors = dict(unet.attn_processors)
    current = processors[f"{names[0]}.processor"] if names else None
    if isinstance(current, TGateAttnProcessor):
        return current.state, names
    modules = dict(unet.named_modules())
    for name in names:
        attn = modules[name]
        if attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ValueError(f"{name}: attn2 with a residual inside the processor can't be gated")
    state = GateState()
    for name in names:
        processors[f"{name}.processor"] = TGateAttnProcessor(name, state, processors[f"{name}.processor"])
    unet.set_attn_processor(processors)
    return state, names


def remove_tgate(unet: Any) -> None:
    """Restore the processors that :func:`install_tgate` wrapped."""
    unet.set_attn_processor({k: _base_processor(v) for k, v in unet.attn_processors.items()})


class PreGateUNet(torch.nn.Module):
    """The UNet for steps before the gate: CFG inside, plus every attn2's CFG-mean as an output.

    CFG lives in the graph so both graphs share one interface (latents ``[B, 4, h, w]`` in, noise
    prediction ``[B, 4, h, w]`` out), the cache mean needs the CFG batch layout anyway, and an engine
    runs the duplication and guidance without extra host round trips.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet
        self.state, self.names = install_tgate(unet)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        guidance_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        self.state.mode, self.state.cfg, self.state.cache, self.state.order = "capture", True, {}, []
        latents = torch.cat([sample, sample])
        states = torch.cat([negative_prompt_embeds, prompt_embeds])
        out = self.unet(latents, timestep, encoder_hidden_states=states, return_dict=False)[0]
        uncond, text = out.chunk(2)
        scale = guidance_scale.to(out.dtype)
        noise = uncond + scale * (text - uncond)
        caches = tuple(self.state.cache[n] for n in self.names)
        self.state.cache = {}
        return (noise, *caches)


class PostGateUNet(torch.nn.Module):
    """The UNet for steps after the gate: no text input, every attn2 replays its cache, batch ``B``."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet
        self.state, self.names = install_tgate(unet)
        self.cross_dim = unet.config.cross_attention_dim

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        if len(caches) != len(self.names):
            raise ValueError(f"expected {len(self.names)} cache tensors, got {len(caches)}")
        self.state.mode, self.state.cache = "replay", dict(zip(self.names, caches, strict=True))
        # Nothing reads the encoder states once every attn2 replays; a 1-token placeholder satisfies
        # the UNet's signature and is dead code in the exported graph.
        unused = sample.new_zeros(sample.shape[0], 1, self.cross_dim)
        out = self.unet(sample, timestep, encoder_hidden_states=unused, return_dict=False)[0]
        self.state.cache = {}
        return out

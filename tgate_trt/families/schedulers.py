"""Schedulers: the configs the presets ship with, and the one factory that makes a diffusers scheduler.

Every stage builds its schedulers here: the random-weight builder from a preset's config, the runtime a
fresh one per run from an export's ``scheduler_config.json`` (schedulers keep step state), the baselines
and the MAC counter from the same configs.
"""

from __future__ import annotations

from typing import Any

from ..contract.errors import UsageError

SCHEDULERS = ("ddim", "euler", "dpm++", "lcm")  # the samplers ``--scheduler`` offers
# diffusers class -> our name: a config's own class is the default when it is one of ours.
_NAMES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++",
    "LCMScheduler": "lcm",
}
_CLASSES = {name: cls for cls, name in _NAMES.items()}
_KWARGS: dict[str, dict[str, Any]] = {"dpm++": {"algorithm_type": "dpmsolver++"}}

# --- the presets' configs (kept in code so --random-weights needs no download) ----------------------------
SD_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
LCM_SCHEDULER: dict[str, Any] = {
    "_class_name": "LCMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
}


def default_scheduler(config: dict[str, Any]) -> str:
    """The config's own scheduler when we support its class, else DDIM (e.g. SD-1.5's PNDM)."""
    return _NAMES.get(str(config.get("_class_name")), "ddim")


def make_scheduler(config: dict[str, Any], name: str | None = None) -> Any:
    """A fresh diffusers scheduler ``name`` (one of :data:`SCHEDULERS`; default: the config's own, see
    :func:`default_scheduler`) configured from ``config`` (a ``scheduler_config.json``'s content)."""
    import diffusers

    name = default_scheduler(config) if name is None else name
    if name not in _CLASSES:
        raise UsageError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return getattr(diffusers, _CLASSES[name]).from_config(config, **_KWARGS.get(name, {}))

"""Engines for an export folder: TensorRT plans (profiles, builder options, the build) and OpenVINO IR
(``openvino.py``), and their CLI, ``tgate-build``.

Nothing here imports TensorRT or OpenVINO at module level, so the pure parts (profiles, settings, checks)
are importable and testable on machines without them.
"""

from .options import BuilderSettings, BuildOptions, builder_settings
from .profiles import profiles_for

__all__ = ["BuildOptions", "BuilderSettings", "builder_settings", "profiles_for"]

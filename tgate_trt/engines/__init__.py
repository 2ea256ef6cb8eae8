"""TensorRT engines for an export folder: profiles, builder options, the build itself and its CLI.

Nothing here imports TensorRT at module level, so the pure parts (profiles, settings, checks) are
importable and testable on machines without it.
"""

from .options import BuilderSettings, BuildOptions, builder_settings
from .profiles import profiles_for

__all__ = ["BuildOptions", "BuilderSettings", "builder_settings", "profiles_for"]

"""Third-party notices that tell a user of these tools nothing, hidden in this one place; ``--verbose``
(every command) shows them again.

Each is matched narrowly: a log record by its logger and message, a Python warning by its category and
message, so anything else those libraries say still shows. :func:`install` runs when ``tgate_trt`` is
imported, before diffusers, transformers or optimum are. Where the cause was ours it is fixed at the
source instead (``dtype`` rather than ``torch_dtype``, pipelines built without a safety checker say so).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# logger name -> patterns (re.match on the message) of the records dropped. A logger's filter sees only
# the records logged on that logger, so each is the module that logs the notice.
LOG_NOTICES: dict[str, tuple[str, ...]] = {
    # diffusers, at import: optimum, optimum-onnx and optimum-intel all provide the ``optimum`` namespace,
    # as they are meant to
    "diffusers.utils.import_utils": (r"Multiple distributions found for package optimum\.",),
    # a pipeline without a safety checker: ours pass requires_safety_checker=False, but optimum's pipelines
    # (bench variants e and f) can't be told
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion": (r"You have disabled the safety checker",),
    # optimum-intel converting bench variant (f): the keyword arguments it passes on to diffusers, and its
    # probe of whether a local folder is already converted (with a hub-cache path in the message)
    "diffusers.pipelines.pipeline_utils": (r"Keyword arguments \{'subfolder': .*\} are not expected by",),
    "optimum.intel.openvino.modeling_base": (r"Could not infer whether the model was already converted",),
    "transformers.modeling_utils": (r"`loss_type=None` was set in the config but it is unrecognized",),
}

# (message pattern, category) of the Python warnings ignored
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # optimum's ORT / OpenVINO text encoders read a diffusers config attribute the deprecated way
    (r"Accessing config attribute `\w+` directly via '\w+' object attribute is deprecated", FutureWarning),
    # torch.jit.TracerWarning (a Warning; importing torch to name it would slow every --help) while
    # optimum-intel traces bench variant (f); our own exports silence tracing where they trace
    (r"Converting a tensor to a Python (boolean|index|integer|float|number)", Warning),
)

ORT_QUIET, ORT_VERBOSE = 3, 2  # ONNX Runtime log severity: errors only; warnings too

_verbose = False


class _Notices(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_FILTERS = {name: _Notices(patterns) for name, patterns in LOG_NOTICES.items()}


def install() -> None:
    """Hide the notices above (idempotent). A command line with ``--verbose`` hides none: some are logged
    while diffusers is imported, before the arguments are parsed (not under pytest, whose -v is --verbose)."""
    if "--verbose" in sys.argv[1:] and "pytest" not in sys.modules:
        verbose()
        return
    for name, notices in _FILTERS.items():
        logging.getLogger(name).addFilter(notices)  # a no-op when already added
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def verbose() -> None:
    """Show third-party notices and warnings again (``--verbose``): the filters above are removed, every
    Python warning shows once per place (``-W default``), ONNX Runtime logs warnings and diffusers shows
    its loading bars."""
    global _verbose
    _verbose = True
    for name, notices in _FILTERS.items():
        logging.getLogger(name).removeFilter(notices)
    warnings.simplefilter("default")  # in front of the ignores above, and of Python's own defaults


def is_verbose() -> bool:
    return _verbose


def ort_log_level() -> int:
    """``SessionOptions.log_severity_level`` for the sessions we make."""
    return ORT_VERBOSE if _verbose else ORT_QUIET

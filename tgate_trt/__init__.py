"""tgate-trt: T-GATE (arXiv 2404.02747) compiled into deployable graphs, engines, a runtime and Triton."""

import logging


class _OptimumNamespaceNotice(logging.Filter):
    """Drop diffusers' import-time warning that several distributions (optimum, optimum-onnx, optimum-intel)
    provide the ``optimum`` namespace: they are meant to, and it shows on every command otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Multiple distributions found for package optimum." not in record.getMessage()


logging.getLogger("diffusers.utils.import_utils").addFilter(_OptimumNamespaceNotice())

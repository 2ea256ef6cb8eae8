"""Models shipped with the package (``shapes``), registered as ``tgate_trt.zoo`` entry points so that the
families stage finds them by name (:mod:`tgate_trt.families.zoo`). Stage order: the last stage before the CLI;
a zoo model may use every earlier stage (its trainer uses the families' tokenizer and scheduler)."""

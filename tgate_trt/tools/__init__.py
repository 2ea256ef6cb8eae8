"""Tools around the product: MAC counting (:mod:`.macs`), attention convergence analysis (:mod:`.analyze`),
benchmarks against the peers a user would pick (:mod:`.bench` and its baselines) and image-quality evaluation
(:mod:`.evaluate`). Stage order: after the runtime and Triton, whose pipeline they measure; nothing earlier
imports them."""

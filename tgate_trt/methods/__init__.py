"""Caching methods as data: the per-step plan (T-GATE V1/V2) that graph variants and the sampler follow."""

"""Internals of :mod:`workbench.evaluate`, one concept per module.

``suites`` (what is evaluated), ``scoring`` (forward passes and per-token NLL/KL), ``base_cache`` (the base
model's outputs, computed once per suite and kept on disk), ``runtime`` (speed, peak memory, generations).
Import from :mod:`workbench.evaluate`; these modules are its implementation.
"""

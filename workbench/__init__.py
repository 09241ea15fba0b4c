"""Efficiency Workbench: load a language model, shrink it, and see what it costs in quality, size and latency."""

__version__ = "0.1.0"

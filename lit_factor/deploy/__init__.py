"""Deployment: export (hf / dense / onnx), ONNX Runtime sessions and fusions, inference rewrites, loading exported
models (``load_pretrained``), latency measurement (a function and a Lightning callback) and profiling.

May import :mod:`lit_factor.train` (to read checkpoints), :mod:`lit_factor.compress` and everything below; never
study or the CLI.
"""

"""The pipeline driver: load -> export -> plan the graph -> calibrate -> match -> search (fold,
clip, quantize per layer) -> quantize the head and the token table -> emit -> the output folder.

``compile`` (``pipeline.driver``) is the Python API and reads as those stages; the CLI is a thin
layer over it. ``pipeline.options``: what it takes; ``pipeline.checks``: what it checks before
the long work; ``pipeline.calibration``: the token ids; ``pipeline.report``: report.json.
"""
from .driver import compile
from .options import CompileOptions, CompileResult, resolve_device

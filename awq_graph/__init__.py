"""awq-graph: AWQ int4 compilation of Hugging Face causal LMs to onnxruntime MatMulNBits models,
with scaling groups derived from the torch.export graph.

The names below load on first use, so ``import awq_graph`` (and the command line's start, where
Ctrl-C must stay a one-line interruption) does not import torch."""
import importlib

_WHERE = {"compile": ".pipeline", "CompileOptions": ".pipeline", "CompileResult": ".pipeline",
          "QuantScheme": ".core.numerics", "Ranks": ".core.ranks", "AwqGraphError": ".core.errors", "ConfigError": ".core.errors",
          "ExportError": ".core.errors", "InputError": ".core.errors", "SchemeError": ".core.errors"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'awq_graph' has no attribute '{name}'")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)

"""awq-graph: AWQ int4 compilation of Hugging Face causal LMs to onnxruntime MatMulNBits models,
with scaling groups derived from the torch.export graph."""
from .core.errors import AwqGraphError, ConfigError, ExportError, InputError, SchemeError
from .core.numerics import QuantScheme
from .pipeline import CompileOptions, CompileResult, compile

__all__ = ["compile", "CompileOptions", "CompileResult", "QuantScheme", "AwqGraphError", "ConfigError", "ExportError",
           "InputError", "SchemeError"]

"""awq-graph: AWQ int4 compilation of Hugging Face causal LMs to onnxruntime MatMulNBits models,
with scaling groups derived from the torch.export graph."""
from .errors import AwqGraphError, ConfigError, ExportError, InputError, SchemeError
from .numerics import QuantScheme
from .pipeline import CompileResult, compile

__all__ = ["compile", "CompileResult", "QuantScheme", "AwqGraphError", "ConfigError", "ExportError",
           "InputError", "SchemeError"]

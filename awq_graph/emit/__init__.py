"""Which ONNX graph compile writes, and the check that it computes what the torch program computes.

``plan_graph`` (``emit.plan``) lists the graphs to try, in order, with why the earlier ones are
skipped; ``write_onnx`` (``emit.write``) writes each in turn, checks it in onnxruntime
(``emit.checks``) and keeps the first that passes:
  * the fused KV-cache decoder of onnxruntime's ops (``emit.decoder``, ``emit.gpt2``) for the
    families of ``emit.families``;
  * the generic KV-cache decoder (``emit.generic``): torch.onnx of the model itself with its cache
    as inputs and outputs, for the other architectures whose cache transformers keeps in its
    standard layers;
  * the logits-only graph (``emit.logits_only``): torch.onnx of the folded program, any
    architecture torch.onnx can translate.
The quantized linears of the torch.onnx graphs are rewritten to MatMulNBits
(``passes.matmulnbits``); the fused writers build them directly.
"""
from awq_graph.emit.checks import (check_decoder, check_written_integers, checked_layers, fake_quant_makers,
                                   fake_quant_overrides)
from awq_graph.emit.plan import FUSED, GraphPlan, decoder_support, graph_facts, plan_graph, untranslatable_ops
from awq_graph.emit.write import Emitted, write_onnx


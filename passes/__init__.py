"""awq_graph.passes: graph analyses and rewrites over the floor (``awq_graph.core``), one job per file:
channel_flow and check_config (match), fold (the scale rewrite), matmulnbits (the ONNX rewrite).
The folder sits at the top of the repository and installs as ``awq_graph.passes``."""

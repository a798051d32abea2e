"""The floor: what every other part of awq-graph stands on, and which imports nothing else of ours.

    errors     the user-facing error classes
    ir         the exported graph as ``GraphModel``: parameters by HF name, ``LinearSite``, the interpreter
    analysis   facts read off the graph: decoder layers, quantizable linears, the head, the token lookup
    numerics   quantize, dequantize, pack, the AWQ statistics and losses: pure tensor functions
    records    what the stages hand each other: ``ScalingGroup``, ``SkippedGroup``, ``FoldKind``, JSON
    ranks      the processes of a distributed compile: their share of the samples, sums, gathers, choices, failures
"""

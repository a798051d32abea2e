"""The model families the fused KV-cache decoder knows, and the shape it is built from.

This is the only place that names transformers model types; the block builders read a
``DecoderShape``, never the model type.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    vocab: int
    eps: float
    scaling: float
    max_positions: int
    window: int  # GroupQueryAttention's local_window_size; -1: full attention
    activation: str = "silu"  # of the gate: silu, gelu_tanh, gelu
    norm_offset: float = 0.0  # gemma's norms multiply by (offset + w)
    embed_scale: float | None = None  # gemma multiplies the looked-up rows by sqrt(hidden)
    experts_per_token: int = 0  # MoE: top-k of the router (0: a dense MLP)
    renormalize: bool = True  # MoE: the picked experts' softmax weights are rescaled to sum to 1
    sandwich: bool = False  # gemma2/3: norms after attention and before and after the MLP
    attn_softcap: float = 0.0  # attention scores -> c * tanh(scores / c); 0: none
    final_softcap: float = 0.0  # logits -> c * tanh(logits / c); 0: none
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" (uses ``window``) or "full_attention"
    clip_qkv: float = 0.0  # olmoe: q, k, v clamped to [-c, c]; 0: none
    residual_scale: float = 1.0  # granite: attention and MLP outputs are multiplied before the residual add
    logits_divisor: float = 1.0  # granite: logits = lm_head(h) / divisor

    def layer_window(self, i: int) -> int:
        return self.window if not self.layer_types or self.layer_types[i] == "sliding_attention" else -1

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

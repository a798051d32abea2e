"""The model families the fused KV-cache decoder knows, and the shape it is built from.

This is the only place that names transformers model types (``FAMILIES``, one row each) and
the module names inside a block (``Names``); the block builders read a ``Family`` and a
``DecoderShape``, never the model type. What the graph knows comes from the graph instead
(``awq_graph.emit.builder.GraphFacts``: the decoder layers, the head, the token table, the
norm offsets). Adding a family is a row here and a test (tests/test_decoder.py: the float
decoder against transformers).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    """Module names of one block kind: relative to a decoder layer (``{layer}.{name}``; q .. k_norm
    relative to ``{layer}.{attention}``, gate .. shared_expert_gate to ``{layer}.{mlp}``), except
    ``final_norm``, ``rotary`` and ``positions`` (top level)."""

    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"  # sandwich: the norm of o on its own
    pre_mlp_norm: str = "pre_feedforward_layernorm"  # sandwich only
    post_mlp_norm: str = "post_feedforward_layernorm"  # sandwich only
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str = "qkv_proj"  # q|k|v as one linear (phi3 stores it so; others are concatenated)
    o: str = "o_proj"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    mlp: str = "mlp"
    gate: str = "gate_proj"  # of the MLP, the shared expert too
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str = "gate_up_proj"  # gate|up as one linear (phi3)
    router: str = "gate"  # of an MoE MLP
    experts_gate_up: str = "experts.gate_up_proj"
    experts_down: str = "experts.down_proj"
    shared_expert: str = "shared_expert"
    shared_expert_gate: str = "shared_expert_gate"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    positions: str = ""  # a learned position table (GPT-2)


GPT2_NAMES = Names(input_norm="ln_1", post_attention_norm="ln_2", attention="attn", qkv="c_attn", o="c_proj",
                   up="c_fc", down="c_proj", final_norm="transformer.ln_f", rotary="",
                   positions="transformer.wpe")


@dataclass(frozen=True)
class Family:
    """What the fused decoder must know of one transformers model type beyond its config."""

    block: str = "llama"  # the builder: "llama" (RMSNorm, rotary GQA, gated MLP or experts) or "gpt2"
    package: str | None = None  # transformers.models.<package> holds its class (default: the model type)
    moe: bool = False  # the MLP is a router over experts (QMoE)
    sandwich: bool = False  # norms after attention and around the MLP; local/global attention per layer
    sliding_window: bool = False  # config.sliding_window applies without use_sliding_window
    multipliers: bool = False  # embedding, residual and attention multipliers, a logits divisor
    qkv_bias: bool = False  # attention_bias puts biases on q, k, v only (o_proj has none)
    genai: str = "decoder"  # onnxruntime-genai's model type for the folder ("decoder": its generic one)
    names: Names = Names()


# qwen3 adds an RMSNorm over each head of q and k before the rotary; gemma scales the embedding
# by sqrt(hidden), writes its norms as x * (1 + w) (the graph says so) and gates with GELU (tanh); gemma2 and gemma3
# add a norm after attention and around the MLP ("sandwich"), alternate local and global
# attention layers, and cap attention scores (gemma2: and logits) with c * tanh(x / c); gemma3
# also norms q and k per head and gives local layers their own rotary base; phi3 fuses q|k|v
# and gate|up into single linears; mixtral's MLP is a router and top-k of E gated experts (QMoE),
# qwen2_moe's, qwen3_moe's and olmoe's too (qwen2_moe adds a gated shared expert; qwen3_moe may
# keep a dense MLP in some layers; olmoe norms all of q and k, and may clamp q, k, v); granite is
# llama with multipliers. What a family's config says (head norms, softcaps, clip_qkv, windows
# per layer type) is read from the config and the parameters, not from this table.
FAMILIES: dict[str, Family] = {
    "llama": Family(genai="llama"),
    "mistral": Family(sliding_window=True, genai="mistral"),
    "qwen2": Family(qkv_bias=True, genai="qwen2"),
    "qwen3": Family(genai="qwen3"),
    "gemma": Family(genai="gemma"),
    "gemma2": Family(sandwich=True, sliding_window=True, genai="gemma2"),
    "gemma3_text": Family(package="gemma3", sandwich=True, sliding_window=True, genai="gemma3_text"),
    "phi3": Family(sliding_window=True, genai="phi3"),
    "granite": Family(multipliers=True, genai="granite"),
    "mixtral": Family(moe=True, sliding_window=True),
    "qwen2_moe": Family(moe=True),
    "qwen3_moe": Family(moe=True),
    "olmoe": Family(moe=True),
    "gpt2": Family(block="gpt2", names=GPT2_NAMES),
}


def family_of(model) -> tuple[Family | None, str | None]:
    """(the family of ``model``, None) or (None, why it has none)."""
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        return None, f"model type '{model_type}' has no fused decoder (have: {', '.join(FAMILIES)})"
    package = family.package or model_type
    if not type(model).__module__.startswith(f"transformers.models.{package}."):
        return None, f"{type(model).__name__} is not transformers' own {model_type} class"
    return family, None


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

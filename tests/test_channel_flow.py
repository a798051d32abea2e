"""Scaling groups derived from the torch.export graph, and Quark configs checked against it."""
import pytest

from awq_graph.export import export_model
from awq_graph.passes.check_config import derive_groups, resolve_config
from awq_graph.core.records import to_quark_config

from conftest import tiny_model

AUTOAWQ_LLAMA = [  # AutoAWQ's hand-written Llama mapping, relative to a decoder layer
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
]


@pytest.fixture(scope="module")
def tiny_graph():
    return export_model(tiny_model())


def test_llama_groups_cover_autoawq_and_add_v_to_o_under_gqa(tiny_graph):
    prefix, per_layer, skipped = derive_groups(tiny_graph)
    assert prefix == "model.layers" and len(per_layer) == 2 and skipped == []
    for i, groups in enumerate(per_layer):
        base = f"model.layers.{i}."
        found = {(g.prev_op.removeprefix(base), tuple(x.removeprefix(base) for x in g.layers),
                  g.module2inspect.removeprefix(base)) for g in groups}
        assert set(AUTOAWQ_LLAMA) <= found
        assert ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj") in found


def test_grouped_query_v_to_o_channel_map_repeats_heads(tiny_graph):
    _, per_layer, _ = derive_groups(tiny_graph)
    vo = next(g for g in per_layer[0] if g.prev_op.endswith("v_proj"))
    heads, kv_heads, head_dim = 4, 2, 16
    expected = [(c // head_dim) // (heads // kv_heads) * head_dim + c % head_dim for c in range(heads * head_dim)]
    assert list(vo.channel_maps[0]) == expected
    assert vo.channels == kv_heads * head_dim


def test_quark_projection_matches_the_llama_template(tiny_graph):
    prefix, per_layer, _ = derive_groups(tiny_graph)
    cfg = to_quark_config(per_layer[0], prefix, len(per_layer))
    assert cfg["model_decoder_layers"] == "model.layers"
    first = cfg["scaling_layers"][0]
    assert first == {"prev_op": "input_layernorm", "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                     "inp": "self_attn.q_proj", "module2inspect": "self_attn"}


def test_a_derived_config_checks_clean_and_resolves_to_the_same_groups(tiny_graph):
    prefix, per_layer, _ = derive_groups(tiny_graph)
    cfg = to_quark_config(per_layer[0], prefix, len(per_layer))
    resolved, faults = resolve_config(tiny_graph, cfg)
    assert faults == []
    assert resolved == per_layer


def test_a_group_read_back_from_its_json_is_the_same_group(tiny_graph):
    """What report.json and the derived config write of a group (names, maps, the fold point's
    kind) is all of it: read back through JSON text, every group of every layer compares equal."""
    import json

    from awq_graph.core.records import ScalingGroup

    _, per_layer, _ = derive_groups(tiny_graph)
    groups = [g for layer in per_layer for g in layer]
    assert len(groups) == 8
    assert [ScalingGroup.from_json(json.loads(json.dumps(g.to_json()))) for g in groups] == groups


def _config(*entries):
    return {"model_decoder_layers": "model.layers", "scaling_layers": list(entries)}


@pytest.mark.parametrize("entry,fault", [
    ({"prev_op": "input_layernorm", "layers": ["self_attn.q_proj", "self_attn.qq_proj"], "inp": "self_attn.q_proj"},
     "scaling_layers[0]: layer 'self_attn.qq_proj' is not a module"),
    ({"prev_op": "no_such_norm", "layers": ["self_attn.q_proj"], "inp": "self_attn.q_proj"},
     "scaling_layers[0]: prev_op 'no_such_norm' is not a module"),
    ({"prev_op": "mlp.gate_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"},
     "scaling_layers[0]: prev_op 'mlp.gate_proj' reaches 'mlp.down_proj' only through 'mlp.act_fn' (silu)"),
    ({"prev_op": "input_layernorm", "layers": ["self_attn.q_proj", "self_attn.k_proj"], "inp": "self_attn.q_proj"},
     "scaling_layers[0]: 'self_attn.v_proj' also reads the scaled tensor but is not compensated"),
    ({"prev_op": "self_attn.o_proj", "layers": ["mlp.gate_proj"], "inp": "mlp.gate_proj"},
     "scaling_layers[0]: prev_op 'self_attn.o_proj' reaches 'mlp.gate_proj' only through"),
])
def test_config_faults_name_the_entry_and_the_graph_reason(tiny_graph, entry, fault):
    _, faults = resolve_config(tiny_graph, _config(entry))
    assert any(f.startswith(fault) for f in faults), faults


def test_unknown_decoder_layers_is_a_fault(tiny_graph):
    _, faults = resolve_config(tiny_graph, {"model_decoder_layers": "model.blocks", "scaling_layers": []})
    assert faults and faults[0].startswith("model_decoder_layers: 'model.blocks'")


@pytest.mark.parametrize("model_type, offset", [("llama", 0.0), ("gemma", 1.0), ("gemma3_text", 1.0)])
def test_norm_offsets_are_read_off_the_graph_for_every_norm(model_type, offset):
    """x * w (llama) against x * (1 + w) (gemma): the emitted norms take the offset the graph has,
    for the norms of groups and for the others (the final norm, gemma3's q/k and sandwich norms)."""
    from awq_graph.passes.channel_flow import norm_offsets

    model = tiny_model(model_type)
    offsets = norm_offsets(export_model(model))
    norms = {n for n, p in model.named_parameters() if "norm" in n}
    assert set(offsets) == norms and set(offsets.values()) == {offset}

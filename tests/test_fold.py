"""Folding alone (no quantization) leaves the float function unchanged."""
import torch

from awq_graph.export import export_model
from awq_graph.passes.check_config import derive_groups
from awq_graph.passes.fold import fold_scales

from conftest import tiny_model


def test_folding_random_scales_along_every_group_keeps_logits(tmp_path):
    model = tiny_model()
    gm = export_model(model)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _, per_layer, _ = derive_groups(gm)
        groups = [g for layer in per_layer for g in layer]
        assert any(g.prev_op.endswith("v_proj") for g in groups)  # the GQA pair is folded too
        gen = torch.Generator().manual_seed(1)
        for g in groups:
            s = torch.exp(torch.empty(g.channels).uniform_(-2.08, 2.08, generator=gen))  # log-uniform 1/8..8
            fold_scales(gm.params, g, s, gm.linears)
        after = gm.run(ids)
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-4, rel  # measured ~3e-7
    changed = sum(not torch.equal(gm.params[k], dict(model.named_parameters()).get(k, gm.params[k])) for k in gm.params)
    assert changed > 0, "the fold edited the program's private weights"
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # the caller's model is untouched


def test_folding_into_a_bank_of_moe_experts_keeps_the_logits():
    """Mixtral: the norm's 1/s also reaches every expert's gate_up columns and the router's;
    the up half of gate_up carries a scale to down_proj, expert by expert."""
    from awq_graph.load import tiny_random_model
    from awq_graph.verify import verify_groups

    gm = export_model(tiny_random_model("mixtral"))
    _, per_layer, _ = derive_groups(gm)
    experts = [g for g in per_layer[0] if any(".experts." in x for x in g.layers)]
    assert len(experts) == 2 and all(gm.linears[x].experts == 4 for g in experts for x in g.layers if "experts" in x)
    check = verify_groups(gm, [experts] + [[] for _ in per_layer[1:]])
    assert check.deviation < 1e-4, check  # measured ~3e-7
    assert check.changed_params >= 4  # the norm, the router, both banks: a fold that changes nothing proves nothing

"""The held-aside check: per layer the candidate of least error on samples the search never saw,
end to end the candidate model of least NLL on them, and a model that scores worse than
round-to-nearest is never written silently."""
import torch

from awq_graph.core.numerics import QuantScheme, quantize
from awq_graph.core.layer_cut import LayerCut
from awq_graph.emit import fake_quant_overrides
from awq_graph.export import export_model
from awq_graph.guard import HeldAsideGuard
from awq_graph.match import match
from awq_graph.passes.fold import fold_scales, folded_params
from awq_graph.search import SearchOptions, awq_search

from conftest import tiny_model

SCHEME = QuantScheme(4, 16)


def _ids(n, seed):
    return torch.randint(0, 320, (n, 48), generator=torch.Generator().manual_seed(seed))


def _nll(gm, ids, quantized) -> float:
    """The program run whole (not layer by layer) with these integers: mean next-token NLL."""
    logp = torch.log_softmax(gm.run(ids, overrides=fake_quant_overrides(gm, quantized)).float()[:, :-1], -1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


def test_the_written_model_scores_on_the_held_aside_samples_what_the_check_measured():
    gm = export_model(tiny_model())
    held = _ids(3, 1)
    with torch.no_grad():
        result = awq_search(gm, match(gm).per_layer, _ids(8, 0), SearchOptions(scheme=SCHEME), held=held)
        check = result.guard
        assert check.held_samples == 3 and check.held_tokens == 3 * 48 and len(check.layers) == 2
        # and per module whose linears clipping changed, a model clipping only there
        assert set(check.nll) == {"float", "searched", "unclipped", "rtn", "clipped only in self_attn",
                                  "clipped only in mlp"}
        float_nll = float(-torch.log_softmax(gm.run(held).float()[:, :-1], -1).gather(-1, held[:, 1:, None]).mean())
        whole = _nll(gm, held, result.quantized)  # gm holds the written model's folds
    # the layer-by-layer streams against the whole program: measured 7e-7 and 8e-8
    assert abs(check.nll["float"] - float_nll) < 1e-4, (check.nll["float"], float_nll)
    assert abs(check.nll[check.written] - whole) < 1e-4, (check.written, check.nll, whole)
    for verdict in check.layers:  # each model took a layer candidate of least error among those it may take
        assert verdict.error[verdict.chosen["searched"]] == min(verdict.error.values())
        assert verdict.chosen["rtn"] == "rtn"


def _planted(gm, bad_layers: set[int], harm):
    """The check run by hand over every layer: for a layer in ``bad_layers``, ``harm(li, linears)``
    makes the search's candidate (folds it may make in place, the clipped integers); elsewhere the
    search's candidate is round-to-nearest's own integers. Returns the report and the written integers."""
    stages = LayerCut(gm)
    guard = HeldAsideGuard(gm, stages, _ids(3, 1), SCHEME)
    kept = {}
    for li in range(stages.n):
        linears = [n for n in gm.linears if n.startswith(f"{stages.prefix}.{li}.")]
        edited = harm(li, linears, snapshot=True) if li in bad_layers else set()
        guard.snapshot(li, linears, edited)
        clipped = (harm(li, linears, snapshot=False) if li in bad_layers else
                   {n: quantize(gm.linears[n].matrix(gm.params).float(), SCHEME) for n in linears})
        unclipped = {n: quantize(gm.linears[n].matrix(gm.params).float(), SCHEME) for n in linears}
        guard.layer(li, stages.stages[li + 1], clipped, unclipped, lambda name, qw: kept.setdefault(name, []) or qw)
    report, written, undone = guard.finish()
    return report, written, undone


def test_a_layer_whose_clipping_raises_the_held_aside_error_keeps_the_unclipped_integers():
    gm = export_model(tiny_model())

    def clip_hard(li, linears, snapshot):  # every range halved: far more error than rounding alone
        return set() if snapshot else {n: quantize(gm.linears[n].matrix(gm.params).float(), SCHEME, 0.5) for n in linears}

    with torch.no_grad():
        report, written, _ = _planted(gm, {1}, clip_hard)
    planted = report.layers[1]
    assert planted.error["awq"] > 2 * planted.error["unclipped"], planted.error  # measured 0.089 vs 0.0021
    assert planted.chosen["searched"] != "awq"
    for name in (n for n in written if ".layers.1." in n):
        full = quantize(gm.linears[name].matrix(gm.params).float(), SCHEME)
        assert torch.equal(written[name].unpack().q if hasattr(written[name], "unpack") else written[name].q, full.q)


def test_a_layer_planted_to_make_awq_worse_keeps_round_to_nearest_and_its_folds_are_undone():
    gm = export_model(tiny_model())
    group = next(g for g in match(gm).per_layer[0] if g.prev_op.endswith("input_layernorm"))
    norm = group.prev_params[0]
    original = gm.params[norm].detach().clone()
    bad = torch.linspace(0.02, 50.0, group.channels)  # a scale no search would choose: 2500x apart

    def bad_scale(li, linears, snapshot):
        if snapshot:
            return set(folded_params(group, gm.linears))
        fold_scales(gm.params, group, bad, gm.linears)
        return {n: quantize(gm.linears[n].matrix(gm.params).float(), SCHEME) for n in linears}

    with torch.no_grad():
        report, written, undone = _planted(gm, {0}, bad_scale)
        layer0 = report.layers[0]
        assert layer0.error["awq"] > 2 * layer0.error["rtn"], layer0.error  # measured 0.0047 vs 0.0015
        # the unclipped integers carry the bad scale too: every model takes the layer as it was
        assert {m: layer0.chosen[m] for m in ("searched", "unclipped", "rtn")} == {m: "rtn" for m in ("searched", "unclipped", "rtn")}
        assert 0 in undone and torch.equal(gm.params[norm], original)  # its folds undone
        # the written model, run whole with the parameters as the check left them, scores what it measured
        whole = _nll(gm, _ids(3, 1), written)
    assert abs(report.nll[report.written] - whole) < 1e-4, (report.written, report.nll, whole)


def test_the_searched_model_is_replaced_only_by_one_whose_nll_is_lower_beyond_the_noise():
    from awq_graph.guard import GuardReport, written_model

    gen = torch.Generator().manual_seed(0)
    searched = 3 + torch.rand(2048, generator=gen, dtype=torch.float64)
    noise = 0.2 * torch.randn(2048, generator=gen, dtype=torch.float64)  # the per-token differences' spread
    noise -= noise.mean()
    # lower by 0.005: under twice the standard error (2 x 0.2 / sqrt(2048) = 0.0088): the search's model stays
    close = {"float": searched - 0.1, "searched": searched, "unclipped": searched + noise - 0.005, "rtn": searched + noise}
    assert written_model(close)[0] == "searched"
    # lower by 0.02 (2.3 standard errors of the difference) : round-to-nearest is written, and said
    worse = {**close, "rtn": searched + noise - 0.02}
    written, standard_error = written_model(worse)
    assert written == "rtn" and abs(standard_error["rtn"] - 0.2 / 2048 ** 0.5) < 0.001, standard_error
    nll = {m: float(v.mean()) for m, v in worse.items()}
    report = GuardReport(4, 2048, nll, written, standard_error)
    assert report.alarming and "wrote rtn" in report.summary()
    # the search's model written but scoring above round-to-nearest within the noise: said, not warned of
    kept = GuardReport(4, 2048, {**nll, "rtn": nll["searched"] - 0.001}, "searched", standard_error)
    assert not kept.alarming and "above round-to-nearest's by 0.0010" in kept.summary()
    assert "above" not in GuardReport(4, 2048, {**nll, "rtn": nll["searched"] + 0.001}, "searched", standard_error).summary()

"""The AWQ search: where activations have outlier channels, searched scales beat round-to-nearest
(torchao's AWQ test, on our graph)."""
import torch

from awq_graph.core.numerics import QuantScheme
from awq_graph.emit import fake_quant_overrides
from awq_graph.export import export_model
from awq_graph.match import match
from awq_graph.search import SCREEN_MARGIN, SearchOptions, awq_search, rtn

from conftest import tiny_model


def test_awq_beats_round_to_nearest_where_a_few_channels_carry_large_activations():
    model = tiny_model()
    with torch.no_grad():  # 4 of 64 channels: activations 30x the others into q|k|v and gate|up
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 30
    gen = torch.Generator().manual_seed(0)
    calib, ids = torch.randint(0, 320, (8, 64), generator=gen), torch.randint(0, 320, (2, 32), generator=gen)
    scheme = QuantScheme(4, 32)
    gm = export_model(model)
    with torch.no_grad():
        ref = gm.run(ids)
        plain = gm.run(ids, overrides=fake_quant_overrides(gm, rtn(gm, scheme).quantized))
        result = awq_search(gm, match(gm).per_layer, calib, SearchOptions(scheme=scheme, clip=False))
        awq = gm.run(ids, overrides=fake_quant_overrides(gm, result.quantized))  # gm holds the folded weights

    def error(logits):
        return float((logits - ref).norm() / ref.norm())

    norm_groups = [g for g in result.groups if g.prev_op.endswith("layernorm")]
    assert norm_groups and all(g.ratio is not None for g in norm_groups)  # every planted group is scaled
    # one fold record per group whose scale is not the identity, naming the parameters it edited
    scaled = [(g.prev_op, tuple(g.layers)) for g in result.groups if g.ratio is not None]
    assert [(f.group.prev_op, f.group.layers) for f in result.folded] == scaled
    for f in result.folded:
        assert f.params[0].startswith(f.group.prev_op) and len(f.params) == len(f.group.prev_params) + len(f.group.layers)
    # measured 0.190 vs 0.320 (ratio 0.59); without the planted channels 0.077 vs 0.084 (0.92)
    assert error(awq) < 0.75 * error(plain), (error(awq), error(plain))


def test_the_loss_cost_model_picks_the_cheaper_form_and_both_forms_choose_the_same():
    """A single-linear group's loss ||X dW^T||^2 is either tr(dW H dW^T) (out x in^2 per grid point)
    or taken from the rows X (out x in x tokens): with 96 calibration tokens the tiny Llama's
    o_proj (64 inputs) gets the quadratic form and its down_proj (128 inputs) the direct one. Forcing
    either form everywhere chooses the same ratios, clips and integers."""
    from awq_graph.search import loss_form

    assert loss_form(tokens=8192, channels=14336, experts=0) == "direct"  # Llama-3-8B's down_proj, 16 x 512
    # Llama-3.2-1B's down_proj at 16 x 512: as many tokens as inputs, but H alone would cost 5.5e11
    # multiply-adds (tokens x in^2), as much as the grid's ~9 float32-equivalent points of either form
    assert loss_form(8192, 8192, 0, out_features=2048, points=9.25) == "direct"
    assert loss_form(65536, 8192, 0, out_features=2048, points=9.25) == "quadratic"  # 128 x 512
    assert loss_form(2048, 2048, 0, out_features=None) == "direct"  # read by the clipping alone: blocks from rows
    assert loss_form(4096, 2048, 0, out_features=None) == "quadratic"  # the rows would outweigh H (float64)
    assert loss_form(tokens=8192, channels=4096, experts=0) == "quadratic"
    assert loss_form(tokens=8192, channels=4096, experts=8) == "quadratic"  # experts: one H per expert
    calib = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(4, 16)
    results = {}
    for form in ("auto", "quadratic", "direct"):
        gm = export_model(tiny_model())
        with torch.no_grad():
            results[form] = awq_search(gm, match(gm).per_layer, calib, SearchOptions(scheme=scheme, loss_form=form))
    auto = {(g.layer, g.layers[0]): g.loss_form for g in results["auto"].groups if g.loss_form != "forward"}
    assert auto == {(i, f"model.layers.{i}.{name}"): form for i in (0, 1)
                    for name, form in (("self_attn.o_proj", "quadratic"), ("mlp.down_proj", "direct"))}
    quadratic, direct = results["quadratic"], results["direct"]
    assert [g.ratio for g in quadratic.groups] == [g.ratio for g in direct.groups]
    for q, d in zip(quadratic.groups, direct.groups):  # the same loss, up to float32 rounding (measured 1.1e-7)
        assert abs(q.loss_awq - d.loss_awq) <= 1e-4 * q.loss_awq, (q, d)
    assert [c.mean_shrink for c in quadratic.clips] == [c.mean_shrink for c in direct.clips]
    for name, qw in quadratic.quantized.items():
        assert torch.equal(qw.q, direct.quantized[name].q), name


def test_device_cuda_without_a_gpu_is_one_line_before_loading(capsys):
    import pytest

    from awq_graph.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["compile", "/no/such/model", "-o", "/tmp/never-written", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("awq-graph: error: --device cuda: ") and err.count("\n") == 1 and "use --device cpu" in err, err
    assert main(["compile", "/no/such/model", "-o", "/tmp/never-written", "--device", "tpu"]) == 1
    assert "choose cpu, cuda, cuda:N or auto" in capsys.readouterr().err


def test_the_search_on_cuda_chooses_what_the_cpu_search_chooses():
    """Each layer's weights go to the GPU while it is searched; the integers come back. Float32
    on both: the same ratios, and integers equal but for rounding ties."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    results = {}
    for device in ("cpu", "cuda"):
        gm = export_model(tiny_model())
        with torch.no_grad():
            results[device] = awq_search(gm, match(gm).per_layer, calib,
                                         SearchOptions(scheme=QuantScheme(4, 16), device=device))
    cpu, cuda = results["cpu"], results["cuda"]
    assert [g.ratio for g in cpu.groups] == [g.ratio for g in cuda.groups]
    for name, qw in cpu.quantized.items():
        assert qw.q.device.type == "cpu" and cuda.quantized[name].q.device.type == "cpu"
        differ = float((qw.q != cuda.quantized[name].q).float().mean())
        assert differ <= 0.01, (name, differ)  # measured on an H200: not yet run


def _with_outlier_channels(model):
    """4 channels 30x the others into q|k|v, as in the first test: the grid has a clear optimum."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 30
    return model


def _searched_alike(model, calib, scheme, form, screen):
    """The search without a screen and with ``screen``, in loss form ``form``: both results, after
    checking that they chose the same ratios, from the same float32 losses, and the same integers."""
    results = []
    for asked in ("off", screen):
        gm = export_model(model)
        with torch.no_grad():
            results.append(awq_search(gm, match(gm).per_layer, calib,
                                      SearchOptions(scheme=scheme, loss_form=form, screen=asked)))
    plain, screened = results
    assert [g.ratio for g in screened.groups] == [g.ratio for g in plain.groups], form
    assert [g.loss_awq for g in screened.groups] == [g.loss_awq for g in plain.groups]  # float32's own losses
    for name, qw in plain.quantized.items():
        assert torch.equal(qw.q, screened.quantized[name].q), (form, name)
    return plain, screened


def test_the_bfloat16_screen_chooses_what_float32_chooses_in_every_loss_form():
    """The grid screened in bfloat16 (single linears through rows X or H's Cholesky factor, the
    attention and MLP subgraphs through their linears' changes) then decided on float32 losses
    makes the choices of the float32 grid: the same ratios and integers, in each loss form, with
    float32 losses for fewer points."""
    model, calib = _with_outlier_channels(tiny_model()), torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    for form in ("quadratic", "direct"):
        plain, screened = _searched_alike(model, calib, QuantScheme(4, 16), form, "bfloat16")
        assert {g.loss_form for g in screened.groups} == {"forward", form}
        assert all(g.exact_points == 21 and g.screen_deviation is None for g in plain.groups)
        # measured: 4-5 float32 points of 21 per group; the screen off by 1.2e-4 .. 4.8e-3 of the best loss
        points = [g.exact_points for g in screened.groups]
        assert sum(points) <= 0.5 * sum(g.exact_points for g in plain.groups), points
        assert all(0 <= g.screen_deviation < 0.05 for g in screened.groups), [g.screen_deviation for g in screened.groups]


def test_the_sketch_screen_chooses_what_float32_chooses_in_both_single_linear_forms():
    """Where bfloat16 products are slow (the default there), a single linear's grid is screened
    with a Gaussian sketch of its rows (an eighth of X's rows, or of H's Cholesky factor's): the
    choices and integers are the float32 grid's, from float32 losses of fewer points. down_proj
    reads 2048 channels over 2048 tokens (both forms have rows to sketch); o_proj's 64 channels
    are too few in the quadratic form, so its grid stays float32 there."""
    model = _with_outlier_channels(tiny_model(intermediate_size=2048))
    calib = torch.randint(0, 320, (32, 64), generator=torch.Generator().manual_seed(2))
    for form in ("quadratic", "direct"):
        plain, sketched = _searched_alike(model, calib, QuantScheme(4, 32), form, "sketch")
        linear = [g for g in sketched.groups if g.loss_form == form]
        expected = {"quadratic": ["mlp.up_proj"], "direct": ["self_attn.v_proj", "mlp.up_proj"]}[form]
        screened = [g for g in linear if g.screen == "sketch"]
        assert sorted({g.prev_op.split(".", 3)[3] for g in screened}) == sorted(expected), form
        assert all(g.screen is None and g.exact_points == 21 for g in linear if g not in screened)
        assert all(g.screen is None for g in sketched.groups if g.loss_form == "forward")  # subgraphs: float32
        # measured: 4-10 float32 points of 21 per sketched group; the sketch off by 1.0e-2 .. 2.4e-2
        points = [g.exact_points for g in screened]
        assert sum(points) <= 0.5 * 21 * len(points), points
        assert all(0 <= g.screen_deviation < 0.05 for g in screened), [g.screen_deviation for g in screened]


def test_the_bfloat16_screen_sketches_rows_that_are_many_and_still_chooses_what_float32_chooses():
    """Where a single linear's rows are many (2048 tokens here, in the direct form), the bfloat16
    screen reads a sketch of them in bfloat16 (an eighth of the rows: Llama-3.2-1B's down_proj at
    16 x 512 went from 0.24 to 0.03 s a point); the choices and integers are still float32's."""
    model = _with_outlier_channels(tiny_model(intermediate_size=2048))
    calib = torch.randint(0, 320, (32, 64), generator=torch.Generator().manual_seed(2))
    plain, screened = _searched_alike(model, calib, QuantScheme(4, 32), "direct", "bfloat16")
    linear = [g for g in screened.groups if g.loss_form == "direct"]
    assert linear and {g.screen for g in linear} == {"bfloat16 sketch"}, [g.screen for g in linear]
    assert {g.screen for g in screened.groups if g.loss_form == "forward"} == {"bfloat16"}
    # measured: 4-7 float32 points of 21 per sketched group, the sketch off by 1.1e-2 .. 2.5e-2
    points = [g.exact_points for g in linear]
    assert sum(points) <= 0.5 * 21 * len(points), points


def test_a_screen_that_errs_more_than_its_margin_widens_until_float32_decides():
    """grid_search on a loss given as a function: float32 losses with a clear optimum at ratio
    0.35, screened ones off by up to 5% of the loss (5x the margin) at every point. The margin
    widens to what the error seen allows, and the choice is float32's."""
    from awq_graph.core.numerics import awq_candidate_scales
    from awq_graph.core.records import ScalingGroup
    from awq_graph.search import grid_search

    channels = 8
    group = ScalingGroup.build("norm", "norm_weight", ("norm.weight",), channels, ["fc"], {"fc": list(range(channels))})
    x_mean = torch.linspace(0.5, 4.0, channels)
    w_mean = torch.linspace(1.0, 0.2, channels)
    target = torch.log(awq_candidate_scales(x_mean, w_mean, 0.35))
    noise = torch.Generator().manual_seed(0)

    def loss_of(s, screened=None):
        exact = 1.0 + float(((torch.log(s) - target) ** 2).sum())
        if screened is None:
            return exact
        return exact * (1 + 0.05 * (2 * float(torch.rand(1, generator=noise)) - 1))

    exact_best = grid_search(loss_of, x_mean, w_mean, group, 20, "cpu")
    screened = grid_search(loss_of, x_mean, w_mean, group, 20, "cpu", screen="bfloat16")
    assert exact_best[1] == 0.35 and screened[1] == 0.35
    assert screened[2]["loss_awq"] == exact_best[2]["loss_awq"]
    assert screened[2]["exact_points"] > 4 and screened[2]["screen_deviation"] > SCREEN_MARGIN / 4


def test_the_clipping_search_a_block_of_rows_at_a_time_chooses_what_one_sweep_of_the_whole_weight_chooses(
        monkeypatch):
    """Rows are independent in the clipping search: swept in blocks of 8 elements' rows (a row at a
    time here) or the whole weight at once, every linear gets the same shrinks, hence the same integers."""
    import awq_graph.search.clipping as search

    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    results = {}
    for elements in (8, 1 << 40):
        monkeypatch.setattr(search, "CLIP_BLOCK_ELEMENTS", elements)
        gm = export_model(tiny_model())
        with torch.no_grad():
            results[elements] = awq_search(gm, match(gm).per_layer, calib, SearchOptions(scheme=QuantScheme(4, 16)))
    blocks, whole = results[8], results[1 << 40]
    assert [c.mean_shrink for c in blocks.clips] == [c.mean_shrink for c in whole.clips]
    assert any(c.mean_shrink < 1 for c in whole.clips)  # some range was shrunk
    for name, qw in whole.quantized.items():
        assert torch.equal(blocks.quantized[name].q, qw.q) and torch.equal(blocks.quantized[name].scale, qw.scale), name


def _inputs_of(gm, ids, site) -> torch.Tensor:
    """The linear's input over ``ids``, from the whole program run by the interpreter: (tokens, in)."""
    from awq_graph.core.ir import run_nodes

    env = {gm.input_node(): ids, **{n: gm.params[gm.param_of(n)] for n in gm.graph.nodes if gm.param_of(n)}}
    run_nodes([n for n in gm.graph.nodes if n.op == "call_function"], env)
    return env[site.input].reshape(-1, site.in_features).double()


def test_clipped_integers_keep_each_groups_output_as_large_as_the_float_one():
    """A clipped range rounds its largest weights toward zero: those integers alone shrink every output
    they make, a coherent error where rounding's errors scatter; on Qwen2.5-1.5B that raised the
    perplexity while lowering every layer's error (docs/quality-on-a-1.5b-model.md). So each clipped
    (row, group) gets the gain that leaves its output error uncorrelated with its float output over
    the calibration tokens: <q x, w x> = <w x, w x>, checked here from the inputs themselves (numpy)."""
    import numpy as np

    model = tiny_model()
    with torch.no_grad():  # heavy-tailed weights: a shrunk range wins in many groups
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight ** 3 * 1e3)
    calib = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(4, 16)
    ratios = {}
    for gain in ("lsq", "unbiased", "off"):
        gm = export_model(model, private=True)
        with torch.no_grad():
            result = awq_search(gm, [[] for _ in range(2)], calib, SearchOptions(scheme=scheme, clip_gain=gain))
            name = "model.layers.0.mlp.down_proj"
            site = gm.linears[name]
            x = _inputs_of(gm, calib, site).numpy()
        clip = next(c for c in result.clips if c.linear == name)
        assert clip.clipped and clip.mean_shrink < 0.97, clip
        w = site.matrix(gm.params).double().numpy()
        q = result.quantized[name].dequantize().double().numpy()
        xg = x.reshape(x.shape[0], -1, 16)  # (tokens, G, 16)
        wy = np.einsum("tgi,ogi->tog", xg, w.reshape(w.shape[0], -1, 16))  # each group's float output
        qy = np.einsum("tgi,ogi->tog", xg, q.reshape(q.shape[0], -1, 16))
        # (out, G): <q x, w x> against <w x, w x> (the float output's size) and <q x, q x> (its own)
        ratios[gain] = ((qy * wy).sum(0) / (wy * wy).sum(0), (qy * wy).sum(0) / (qy * qy).sum(0))
    # "unbiased": every group's error uncorrelated with its float output; "lsq" (the default): with its
    # own output (measured max deviations 4.7e-7 and 3.1e-7), the float output's size kept to a mean
    # 0.995 (lowest 0.984); without a gain the clipped groups fall short (measured: mean 0.991, lowest
    # 0.952, 15% of the groups under 0.98)
    assert np.abs(ratios["unbiased"][0] - 1).max() < 1e-4, np.abs(ratios["unbiased"][0] - 1).max()
    assert np.abs(ratios["lsq"][1] - 1).max() < 1e-4, np.abs(ratios["lsq"][1] - 1).max()
    off = ratios["off"][0]
    assert off.mean() < 0.995 and off.min() < 0.97, (off.mean(), off.min())
    assert ratios["lsq"][0].mean() > off.mean() and ratios["lsq"][0].min() > off.min()


def test_propagating_the_quantized_output_changes_what_later_layers_are_fitted_on_and_not_layer_0():
    """``propagate="quantized"``: layer i + 1 is calibrated on layer i's output with its integers,
    not on the float output. Layer 0 reads the embeddings either way, so its choices and integers
    are the same; layer 1's inputs, hence its losses, are not."""
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (4, 32), generator=gen)
    scheme = QuantScheme(4, 16)
    results = {}
    for mode in ("float", "quantized"):
        gm = export_model(tiny_model())
        results[mode] = awq_search(gm, match(gm).per_layer, calib, SearchOptions(scheme=scheme, propagate=mode))
    float_, quant = results["float"], results["quantized"]
    layer0 = [n for n in float_.quantized if ".layers.0." in n]
    assert layer0 and all(torch.equal(float_.quantized[n].unpack().q, quant.quantized[n].unpack().q) for n in layer0)
    losses = {mode: [g.loss_rtn for g in r.groups if g.layer == 1] for mode, r in results.items()}
    assert all(a != b for a, b in zip(losses["float"], losses["quantized"])), losses


def test_token_weights_enter_the_losses_as_x_transpose_w_x_and_leave_x_mean_alone():
    """SearchOptions.token_weight="residual": each token's weight multiplies its rows in H (and in
    the direct form's rows, as sqrt(w)), not the mean |x| AWQ's candidate scales are made of."""
    from awq_graph.search.statistics import InputStats

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    w = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) + 0.1
    rows = x.reshape(-1, 8).double()
    quadratic, direct, plain = InputStats(8, form="quadratic"), InputStats(8, form="direct"), InputStats(8)
    quadratic.add(x, weight=w)
    direct.add(x, weight=w)
    plain.add(x)
    expected = rows.T @ (rows * w.reshape(-1, 1).double())
    top = float(expected.abs().max())
    # float32 products (sqrt(w) x, each side) summed in float64: measured 7e-8 of the largest entry
    assert float((quadratic.gram - expected).abs().max()) < 1e-5 * top
    sqrt_w_x = direct.scaled(None).double()
    assert float((sqrt_w_x.T @ sqrt_w_x - expected).abs().max()) < 1e-5 * top
    assert torch.equal(quadratic.x_mean, plain.x_mean) and not torch.allclose(quadratic.gram, plain.gram)


def test_the_residual_token_weights_change_the_search_and_still_beat_round_to_nearest_on_the_calibration():
    gm = export_model(tiny_model())
    per_layer = match(gm).per_layer
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = dict(scheme=QuantScheme(4, 16), loss_tokens=64)
    plain = awq_search(gm, per_layer, calib, SearchOptions(**opts))
    weighted = awq_search(export_model(tiny_model()), per_layer, calib, SearchOptions(token_weight="residual", **opts))
    assert all(g.loss_awq <= g.loss_rtn for g in weighted.groups)  # the identity is on the grid
    assert [g.loss_rtn for g in weighted.groups] != [g.loss_rtn for g in plain.groups]  # another objective

"""Quantization numerics against plain loops and the group convention."""
import pytest
import torch

from awq_graph.core.errors import SchemeError
from awq_graph.core.numerics import QuantScheme, blockwise_quadratic_error, dequantize, fake_quantize, quantize


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_features", [64, 96, 576])
def test_each_group_uses_its_own_range_including_a_short_last_group(symmetric, in_features):
    torch.manual_seed(0)
    scheme = QuantScheme(4, 64, symmetric)
    w = torch.randn(5, in_features)
    qw = quantize(w, scheme)
    for g0 in range(0, in_features, 64):
        block = w[:, g0:g0 + 64]  # the last one may be shorter
        g = g0 // 64
        if symmetric:
            scale = block.abs().amax(1) / 7
            zero = torch.full_like(scale, 8)
        else:
            scale = (block.amax(1).clamp(min=0) - block.amin(1).clamp(max=0)) / 15
            zero = torch.round(-block.amin(1).clamp(max=0) / scale)
        torch.testing.assert_close(qw.scale[:, g], scale)
        assert torch.equal(qw.zero[:, g].float(), zero)
        expect = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 15)
        assert torch.equal(qw.q[:, g0:g0 + 64].float(), expect)


def test_dequantized_error_is_at_most_half_a_step():
    torch.manual_seed(1)
    scheme = QuantScheme(4, 32, False)
    w = torch.randn(8, 100)
    qw = quantize(w, scheme)
    err = (qw.dequantize() - w).abs()
    step = qw.scale.repeat_interleave(32, dim=1)[:, :100]
    assert bool((err <= step / 2 + 1e-6).all())
    torch.testing.assert_close(fake_quantize(w, scheme), dequantize(qw.q, qw.scale, qw.zero, 32))


def test_shrinking_the_range_clips_both_ends():
    scheme = QuantScheme(4, 16, False)
    w = torch.linspace(-2.0, 1.0, 16).reshape(1, 16)
    deq = fake_quantize(w, scheme, shrink=0.5)
    assert float(deq.min()) >= -1.0 - 1e-6 and float(deq.max()) <= 0.5 + 1e-6


def test_blockwise_error_matches_per_group_products():
    torch.manual_seed(2)
    dw = torch.randn(3, 40)
    x = torch.randn(50, 40)
    h = x.T @ x
    err = blockwise_quadratic_error(dw, h, 16)  # groups 16, 16, 8
    for g, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)]):
        ref = ((x[:, a:b] @ dw[:, a:b].T) ** 2).sum(0)
        torch.testing.assert_close(err[:, g], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(3, 128), (2, 128), (4, 48), (4, 8), (4, 100)])
def test_unsupported_schemes_are_refused_with_the_reason(bits, group):
    with pytest.raises(SchemeError, match="bits|power of two"):
        QuantScheme(bits, group)


def test_scheme_names_follow_quark():
    assert QuantScheme.parse("uint4_wo_128") == QuantScheme(4, 128, False)
    assert QuantScheme.parse("int4_wo_64") == QuantScheme(4, 64, True)
    assert QuantScheme(4, 32, True).name == "int4_wo_32"


def test_each_end_of_an_asymmetric_range_shrinks_on_its_own():
    scheme = QuantScheme(4, 16, False)
    w = torch.linspace(-2.0, 1.0, 16).reshape(1, 16)
    deq = fake_quantize(w, scheme, shrink=(1.0, 0.5))  # (for max, for min)
    assert float(deq.min()) >= -1.0 - 1e-6
    assert abs(float(deq.max()) - 1.0) < 0.11  # max end kept (within a step)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(4, 32, symmetric=True), QuantScheme(8, 16)],
                         ids=lambda s: s.name)
def test_rows_taken_from_packed_integers_are_the_packing_of_the_rows_taken(scheme):
    """A bank of experts is held packed and the QMoE writer reorders its rows (gate and up
    interleaved) without unpacking: each row's nibbles, scales and zero points are its own."""
    from awq_graph.core.numerics import PackedWeight

    qw = quantize(torch.randn(24, 80, generator=torch.Generator().manual_seed(0)), scheme)  # 3 groups, the last short
    order = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    taken, expected = PackedWeight.of(qw).take_rows(order), PackedWeight.of(qw.take_rows(order))
    assert taken.shape == expected.shape == (24, 80)
    assert torch.equal(taken.blob, expected.blob) and torch.equal(taken.scales, expected.scales)
    assert (taken.zeros is None) == scheme.symmetric
    if taken.zeros is not None:
        assert torch.equal(taken.zeros, expected.zeros)
    assert torch.equal(taken.q, qw.q[order]) and torch.equal(taken.zero, qw.zero[order])


def test_a_weight_quantized_a_block_of_rows_at_a_time_gets_the_integers_of_one_pass(monkeypatch):
    """Rows are independent, so a bank of experts is quantized QUANTIZE_ROWS rows at a time (its
    float temporaries stay a block's): the same integers, scales and zero points, with shrinks per
    (row, group) too."""
    from awq_graph.core import numerics

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 80, generator=gen)
    hi, lo = 1 - 0.3 * torch.rand(30, 3, generator=gen), 1 - 0.3 * torch.rand(30, 3, generator=gen)
    for scheme, shrink in [(QuantScheme(4, 32), (hi, lo)), (QuantScheme(4, 32, symmetric=True), 0.9),
                           (QuantScheme(8, 16), 1.0)]:
        whole = quantize(w, scheme, shrink)
        monkeypatch.setattr(numerics, "QUANTIZE_ROWS", 7)  # 30 rows: blocks of 7, the last of 2
        blocks = quantize(w, scheme, shrink)
        monkeypatch.undo()
        assert torch.equal(whole.q, blocks.q) and torch.equal(whole.scale, blocks.scale), scheme
        assert torch.equal(whole.zero, blocks.zero), scheme


def test_a_scaled_weight_fake_quantized_in_its_own_buffer_is_the_plain_expression(monkeypatch):
    """scaled_fake_quantize(w, s) works a block of rows at a time in the output's buffer (no
    temporary of the weight's size): exactly fake_quantize(w * s) / s, the group size dividing
    the width or not (96 = 3 groups of 32; 80 = 2 of 32 and a short one)."""
    from awq_graph.core import numerics

    gen = torch.Generator().manual_seed(1)
    monkeypatch.setattr(numerics, "QUANTIZE_ROWS", 7)
    for in_features, scheme in [(96, QuantScheme(4, 32)), (80, QuantScheme(4, 32)), (96, QuantScheme(8, 32, symmetric=True))]:
        w = torch.randn(30, in_features, generator=gen)
        s = 0.5 + torch.rand(in_features, generator=gen)
        assert torch.equal(numerics.scaled_fake_quantize(w, s, scheme), fake_quantize(w * s, scheme) / s), scheme


def test_a_gaussian_sketch_of_rows_estimates_their_squared_products_without_bias():
    """||S R dW^T||^2 against ||R dW^T||^2 (the loss the sketch screen estimates) for 200 random
    dW: the mean ratio is 1 within the spread the sketch's size allows, and one sketch is fixed
    by its seed."""
    from awq_graph.core.numerics import gaussian_sketch

    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2048, 64, generator=gen) * torch.linspace(0.1, 3.0, 64)  # unequal channels
    sketch = gaussian_sketch(rows, 256)
    assert sketch.shape == (256, 64) and torch.equal(sketch, gaussian_sketch(rows, 256))
    ratios = []
    for _ in range(200):
        dw = torch.randn(16, 64, generator=gen)
        ratios.append(float((sketch @ dw.T).square().sum() / (rows @ dw.T).square().sum()))
    ratios = torch.tensor(ratios)
    # measured: mean 1.009, spread 0.022 (the sketch's own error is common to all 200 ratios)
    assert abs(float(ratios.mean()) - 1) < 0.1 and float(ratios.std()) < 0.1, (float(ratios.mean()), float(ratios.std()))

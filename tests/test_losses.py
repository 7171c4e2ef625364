"""Interpolation and the soft cross-entropy against hand-computed values."""

import math

import pytest
import torch

from lightning_multimix.dense import soft_cross_entropy
from lightning_multimix.interpolation import interpolate
from lightning_multimix.targets import one_hot, smooth_


def test_interpolate_hand_computed():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    weights = torch.tensor([[0.5, 0.0], [0.5, 0.2], [0.0, 0.8]])
    expected = torch.tensor([[2.0, 3.0], [0.2 * 3 + 0.8 * 5, 0.2 * 4 + 0.8 * 6]])
    torch.testing.assert_close(interpolate(values, weights), expected)


def test_interpolate_keeps_trailing_shape_and_rejects_mismatch():
    assert interpolate(torch.randn(4, 3, 5), torch.full((4, 7), 0.25)).shape == (7, 3, 5)
    with pytest.raises(ValueError, match="rows"):
        interpolate(torch.randn(4, 3), torch.full((5, 2), 0.2))


def test_interpolated_labels_are_the_sums_of_weights_by_class():
    """Row c of the interpolated one-hot targets sums the weights of the examples labelled c (a written-out loop);
    labels outside [0, c), such as an ignore index, add nothing: their one-hot rows are zero."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(7, 40, generator=g)
    for labels in (torch.tensor([2, 0, 2, -100, 1, 5, 2]), torch.tensor([2, 0, 2, 1, 1, 0, 2]),
                   torch.tensor([2, 0, 2, 1, 1, 0, 2], dtype=torch.int32)):
        expected = torch.zeros(3, 40)
        for i, label in enumerate(labels.tolist()):
            if 0 <= label < 3:
                expected[label] += weights[i]
        torch.testing.assert_close(interpolate(one_hot(labels, 3), weights), expected.T, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        interpolate(one_hot(labels[:3], 3), weights)


def test_one_hot_hand_computed():
    torch.testing.assert_close(one_hot(torch.tensor([1, 0]), 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(one_hot(torch.tensor([3, -1]), 3), torch.zeros(2, 3))  # out of range: no class


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    row0 = -(0.2 * (1 - log_z) + 0.3 * (2 - log_z) + 0.5 * (3 - log_z))
    row1 = math.log(3)
    torch.testing.assert_close(soft_cross_entropy(logits, targets), torch.tensor((row0 + row1) / 2))


def test_soft_cross_entropy_label_smoothing_matches_torch():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(soft_cross_entropy(logits, smooth_(one_hot(labels, 4), 0.1, 4)), expected)


def test_soft_cross_entropy_is_float32_under_low_precision():
    logits = torch.randn(4, 3).bfloat16()
    assert soft_cross_entropy(logits, torch.full((4, 3), 1 / 3)).dtype == torch.float32


@pytest.mark.parametrize("shape, dim", [((7, 4), 0), ((7, 4), -1), ((3, 4, 5), 1), ((3, 4, 5), -1), ((3, 4, 5), 0)])
def test_soft_cross_entropy_along_any_class_dimension(shape, dim):
    """``F.cross_entropy`` laid out per class dimension equals the written-out formula, gradients included."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g, requires_grad=True)
    targets = torch.rand(*shape, generator=g)
    targets = targets / targets.sum(dim, keepdim=True)
    smoothed = 0.9 * targets + 0.1 / shape[dim]
    expected = -(smoothed * logits.log_softmax(dim)).sum(dim).mean()
    loss = soft_cross_entropy(logits, smooth_(targets.clone(), 0.1, shape[dim]), dim=dim)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_soft_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(3, 2))


def test_interpolation_stays_float32_under_autocast():
    values = torch.randn(5, 3).bfloat16()
    weights = torch.distributions.Dirichlet(torch.ones(5)).sample((7,)).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = interpolate(values, weights)
        mixed_targets = interpolate(torch.eye(5), weights)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(7), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed, weights.T @ values.float())

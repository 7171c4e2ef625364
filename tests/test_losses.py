"""Interpolation and losses against hand-computed values; the logit path equals the embedding path exactly."""

import math

import pytest
import torch

from lightning_multimix.interpolation import interpolate, labels_out_of_range, one_hot
from lightning_multimix.losses import multimix_logit_loss, multimix_loss, soft_cross_entropy


def test_interpolate_hand_computed():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    weights = torch.tensor([[0.5, 0.0], [0.5, 0.2], [0.0, 0.8]])
    expected = torch.tensor([[2.0, 3.0], [0.2 * 3 + 0.8 * 5, 0.2 * 4 + 0.8 * 6]])
    torch.testing.assert_close(interpolate(values, weights), expected)


def test_interpolate_keeps_trailing_shape_and_rejects_mismatch():
    assert interpolate(torch.randn(4, 3, 5), torch.full((4, 7), 0.25)).shape == (7, 3, 5)
    with pytest.raises(ValueError, match="rows"):
        interpolate(torch.randn(4, 3), torch.full((5, 2), 0.2))


def test_one_hot_and_range_flag():
    torch.testing.assert_close(one_hot(torch.tensor([1, 0]), 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert not labels_out_of_range(torch.tensor([0, 2]), 3)
    assert labels_out_of_range(torch.tensor([0, 3]), 3)
    assert labels_out_of_range(torch.tensor([-1, 0]), 3)


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
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot(labels, 4), label_smoothing=0.1), expected)


def test_soft_cross_entropy_is_float32_under_low_precision():
    logits = torch.randn(4, 3).bfloat16()
    assert soft_cross_entropy(logits, torch.full((4, 3), 1 / 3)).dtype == torch.float32


def test_logit_path_equals_embedding_path_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    embeddings = torch.randn(6, 5, requires_grad=True)
    targets = one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    weights = torch.distributions.Dirichlet(torch.ones(6)).sample((40,)).T

    loss_embedding = multimix_loss(embeddings, targets, weights, head)
    grads_embedding = torch.autograd.grad(loss_embedding, [embeddings, head.weight, head.bias])
    loss_logit = multimix_logit_loss(head(embeddings), targets, weights)
    grads_logit = torch.autograd.grad(loss_logit, [embeddings, head.weight, head.bias])

    torch.testing.assert_close(loss_logit, loss_embedding)
    for a, b in zip(grads_logit, grads_embedding):
        torch.testing.assert_close(a, b)


def test_multimix_loss_hand_computed_for_two_examples():
    # two examples, one tuple with weights (0.25, 0.75), identity head: logits are the interpolated embedding
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    targets = torch.eye(2)
    weights = torch.tensor([[0.25], [0.75]])
    mixed = [0.5, 1.5]
    log_z = math.log(math.exp(mixed[0]) + math.exp(mixed[1]))
    expected = -(0.25 * (mixed[0] - log_z) + 0.75 * (mixed[1] - log_z))
    torch.testing.assert_close(multimix_loss(embeddings, targets, weights, lambda z: z), torch.tensor(expected))


def test_interpolation_stays_float32_under_autocast():
    values = torch.randn(5, 3).bfloat16()
    weights = torch.distributions.Dirichlet(torch.ones(5)).sample((7,)).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = interpolate(values, weights)
        mixed_targets = interpolate(torch.eye(5), weights)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(7), rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed, weights.T @ values.float())

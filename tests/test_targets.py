"""Targets beyond class indices: ``(b, c)`` probabilities with the cross-entropy, multi-hot targets with BCE with
logits, and single labels with BCE on ``one_hot(labels)``, each against a reference written here (loops over tuples)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import DIM, NUM_CLASSES, RecordingMultiMix, TinyCNN, TinyMLP, trainer
from lightning_multimix import Dense, MultiMixError, SelfDistillation, TeacherOutputs, mixup_objective
from lightning_multimix import multimix_objective
from lightning_multimix.dense import attention_from_scores, dense_weights
from lightning_multimix.sampling import dirichlet_weights


def loop_loss(logits: Tensor, targets: Tensor, weights: Tensor, loss: str, eps: float = 0.0) -> Tensor:
    """The mixed loss written out, one tuple at a time: ``L(sum_i w_ik z_i, (1 - eps) sum_i w_ik t_i + eps / c)``."""
    c, terms = logits.shape[1], []
    for k in range(weights.shape[1]):
        z = (weights[:, k, None] * logits).sum(0)
        t = (1 - eps) * (weights[:, k, None] * targets).sum(0) + eps / c
        if loss == "bce":
            terms.append((F.softplus(z) - t * z).mean())  # BCE with logits, by its formula
        else:
            terms.append(-(t * torch.log_softmax(z, 0)).sum())
    return torch.stack(terms).mean()


def draws(m: int = 6, c: int = 4, n: int = 9, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, c, generator=g)
    labels = torch.randint(0, c, (m,), generator=g)
    multi_hot = (torch.rand(m, c, generator=g) > 0.5).float()
    weights = dirichlet_weights(m, n, generator=g)
    return logits, labels, multi_hot, weights


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_objective_with_one_hot_targets_is_the_integer_label_objective(eps):
    logits, labels, _, weights = draws()
    one_hot = F.one_hot(labels, 4).float()
    expected = multimix_objective(weights, labels, logits=logits, label_smoothing=eps)
    torch.testing.assert_close(multimix_objective(weights, one_hot, logits=logits, label_smoothing=eps), expected)
    torch.testing.assert_close(expected, loop_loss(logits, one_hot, weights, "cross_entropy", eps))


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("tuple_size", [None, 2])
def test_bce_on_mixed_targets_equals_a_loop_over_tuples(eps, tuple_size):
    logits, labels, multi_hot, _ = draws()
    weights = dirichlet_weights(6, 9, tuple_size=tuple_size, generator=torch.Generator().manual_seed(1))
    for targets in (labels, multi_hot):  # one_hot(labels) (timm's BCE recipe) and multi-hot
        reference = loop_loss(logits, targets if targets.is_floating_point() else F.one_hot(targets, 4).float(),
                              weights, "bce", eps)
        got = multimix_objective(weights, targets, logits=logits, loss="bce", label_smoothing=eps)
        torch.testing.assert_close(got, reference)


def test_embedding_space_with_probabilities_and_bce_equals_the_loop():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))  # not affine: embedding space
    embeddings, weights = torch.randn(6, 5), dirichlet_weights(6, 8, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(torch.randn(6, 4), -1)
    for loss, targets in (("cross_entropy", probs), ("bce", (probs > 0.25).float())):
        mixed_logits = head(weights.T @ embeddings)  # the head on each interpolated embedding
        terms = [(F.softplus(z) - t * z).mean() if loss == "bce" else -(t * torch.log_softmax(z, 0)).sum()
                 for z, t in zip(mixed_logits, weights.T @ targets)]
        reference = torch.stack(terms).mean()
        got = multimix_objective(weights, targets, embeddings=embeddings, head=head, loss=loss)
        torch.testing.assert_close(got, reference)


def test_mixup_objective_lerps_soft_targets_and_one_hot_bce():
    logits, labels, multi_hot, _ = draws()
    lam, partner = torch.tensor(0.3), torch.tensor([3, 0, 5, 1, 2, 4])
    for loss, targets, dense in (("cross_entropy", torch.softmax(torch.randn(6, 4), -1), None),
                                 ("bce", multi_hot, None), ("bce", labels, F.one_hot(labels, 4).float())):
        t = dense if dense is not None else targets
        mixed = 0.3 * t + 0.7 * t[partner]
        reference = (F.softplus(logits) - mixed * logits).mean() if loss == "bce" else \
            -(mixed * torch.log_softmax(logits, 1)).sum(1).mean()
        torch.testing.assert_close(mixup_objective(logits, targets, lam, partner, loss=loss), reference)


def test_a_bce_teacher_enters_the_targets_through_its_sigmoid():
    logits, _, multi_hot, weights = draws()
    teacher_logits = torch.randn(6, 4)
    teacher = TeacherOutputs(logits=teacher_logits, weight=0.4, temperature=2.0)
    blended = 0.6 * multi_hot + 0.4 * torch.sigmoid(teacher_logits / 2.0)
    got = multimix_objective(weights, multi_hot, logits=logits, loss="bce", teacher=teacher)
    torch.testing.assert_close(got, loop_loss(logits, blended, weights, "bce"))


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_dense_with_soft_targets_weighs_positions_by_the_target_weighted_scores(loss):
    """Attention from ``F_ij . W^T t_i``; one-hot targets give exactly the integer labels' dense loss."""
    torch.manual_seed(0)
    head, features = nn.Linear(5, 4), torch.randn(6, 3, 5)
    targets = torch.softmax(torch.randn(6, 4), -1) if loss == "cross_entropy" else (torch.rand(6, 4) > 0.5).float()
    weights = dirichlet_weights(6, 7, generator=torch.Generator().manual_seed(3))
    scores = torch.einsum("mrd,md->mr", features, targets @ head.weight)
    per_position = dense_weights(weights, attention_from_scores(scores, "cam"))  # (m, n, r)
    mixed_logits = torch.einsum("mnr,mrc->nrc", per_position, head(features))
    mixed_targets = torch.einsum("mnr,mc->nrc", per_position, targets)
    if loss == "bce":
        reference = (F.softplus(mixed_logits) - mixed_targets * mixed_logits).mean()
    else:
        reference = -(mixed_targets * torch.log_softmax(mixed_logits, -1)).sum(-1).mean()
    got = multimix_objective(weights, targets, feature_map=features, head=head, loss=loss)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(multimix_objective(weights, F.one_hot(labels, 4).float(), feature_map=features,
                                                  head=head, loss=loss),
                               multimix_objective(weights, labels, feature_map=features, head=head, loss=loss))


# ---------------------------------------------------------------------------------------------------- the callback


class Module(TinyMLP):
    """A user's module whose ``training_step`` returns one of the losses users train with."""

    def __init__(self, loss: str, lr: float = 0.0) -> None:
        super().__init__(lr=lr)
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        z = self(x)
        if self.loss == "probs":
            return F.cross_entropy(z, y)
        if self.loss == "multi_hot":
            return F.binary_cross_entropy_with_logits(z, y)
        if self.loss == "one_hot_bce":
            return F.binary_cross_entropy_with_logits(z, F.one_hot(y, NUM_CLASSES).float())
        if self.loss == "smoothed_bce":  # timm's recipe: off = eps / c, on = 1 - eps + off
            return F.binary_cross_entropy_with_logits(z, F.one_hot(y, NUM_CLASSES).float() * 0.8 + 0.2 / NUM_CLASSES)
        if self.loss == "pos_weight":
            return F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.full((NUM_CLASSES,), 3.0))
        if self.loss == "bce_sum":
            return F.binary_cross_entropy_with_logits(z, y, reduction="sum")
        if self.loss == "focal":
            p = torch.sigmoid(z)
            return (F.binary_cross_entropy_with_logits(z, y, reduction="none") * (1 - p).pow(2)).mean()
        return F.cross_entropy(z, y)


def targets_for(loss: str, n: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss == "probs":
        return torch.softmax(2 * torch.randn(n, NUM_CLASSES, generator=g), -1)
    if loss in ("one_hot_bce", "smoothed_bce", "integer"):
        return torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return (torch.rand(n, NUM_CLASSES, generator=g) > 0.5).float()


def fit(loss: str, targets: Tensor, **options: Any) -> tuple[RecordingMultiMix, TinyMLP]:
    torch.manual_seed(0)
    model = Module(loss)  # lr 0: the weights stay put, so the references can be computed after the fit
    options = {"n_tuples": 5, **options} if options.get("mode") != "pairs" else options
    callback = RecordingMultiMix(seed=0, **options)
    loader = DataLoader(TensorDataset(torch.randn(targets.shape[0], DIM, generator=torch.Generator().manual_seed(1)),
                                      targets), batch_size=4)
    trainer(callbacks=[callback]).fit(model, loader)
    return callback, model


@pytest.mark.parametrize("loss, kind, eps", [("probs", "cross_entropy", 0.0), ("multi_hot", "bce", 0.0),
                                             ("one_hot_bce", "bce", 0.0), ("smoothed_bce", "bce", 0.2)])
def test_the_three_set_ups_train_with_the_callback_alone_on_the_reference_loss(loss, kind, eps):
    targets = targets_for(loss)
    callback, model = fit(loss, targets)
    assert callback.batch_counts["multimix"] == 4
    for batch, weights, got in zip(callback.batches, callback.weights, callback.losses):
        x, y = batch
        with torch.no_grad():
            logits = model(x)
        dense_targets = y if y.is_floating_point() else F.one_hot(y, NUM_CLASSES).float()
        torch.testing.assert_close(got, loop_loss(logits, dense_targets, weights, kind, eps), rtol=1e-5, atol=1e-6)


def test_one_hot_probability_targets_train_exactly_as_integer_labels():
    labels = targets_for("integer")
    integer, _ = fit("integer", labels, probability=0.5)
    one_hot, _ = fit("probs", F.one_hot(labels, NUM_CLASSES).float(), probability=0.5)
    assert integer.batch_counts == one_hot.batch_counts
    torch.testing.assert_close(torch.stack(one_hot.step_losses), torch.stack(integer.step_losses))


@pytest.mark.parametrize("options", [dict(mode="pairs"), dict(probability=0.5),
                                     dict(distill=SelfDistillation(warmup_steps=0, ema_decay=0.5))])
def test_bce_trains_with_pairs_input_mixup_and_distillation(options):
    callback, _ = fit("multi_hot", targets_for("multi_hot"), **options)
    assert sum(callback.batch_counts.values()) == 4 and all(torch.isfinite(torch.stack(callback.step_losses)))


class MultiLabelCNN(TinyCNN):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.binary_cross_entropy_with_logits(self(batch[0]), batch[1])


def test_dense_trains_on_multi_hot_targets():
    torch.manual_seed(0)
    model = MultiLabelCNN()
    targets = targets_for("multi_hot")
    callback = RecordingMultiMix(n_tuples=5, seed=0, dense=Dense())
    loader = DataLoader(TensorDataset(torch.randn(16, 2, 4, 4), targets), batch_size=4)
    trainer(callbacks=[callback]).fit(model, loader)
    assert callback.batch_counts["multimix"] == 4 and all(torch.isfinite(torch.stack(callback.losses)))


@pytest.mark.parametrize("loss, match", [
    ("pos_weight", r"`pos_weight`"), ("bce_sum", r"sum instead of a mean"), ("focal", r"focal"),
])
def test_losses_that_are_not_affine_in_the_targets_are_refused_with_the_fix(loss, match):
    with pytest.raises(MultiMixError, match=match):
        fit(loss, targets_for("multi_hot"))


@pytest.mark.parametrize("loss, targets, options, match", [
    ("multi_hot", 2 * targets_for("multi_hot"), {}, r"outside \[0, 1\]"),
    ("probs", torch.full((16, NUM_CLASSES), 0.2), {}, r"do not sum to 1"),
    ("probs", targets_for("probs"), {"head": "net.0"}, r"shape \(4, 3\).*'net.0' gives 8 outputs"),
])
def test_targets_that_are_not_the_losses_are_clear_errors_on_the_first_batch(loss, targets, options, match):
    with pytest.raises(MultiMixError, match=match):
        fit(loss, targets, **options)


def test_bad_targets_after_the_first_batch_are_counted_on_the_device():
    targets = targets_for("probs")
    targets[9] = torch.tensor([0.5, 0.5, 0.5])  # batch 2: a row that is not a probability
    with pytest.raises(MultiMixError, match=r"do not sum to 1.* at a training batch from 1 to 3"):
        fit("probs", targets)


def test_multi_hot_targets_mix_pairs_unless_told_otherwise(caplog):
    callback, _ = fit("multi_hot", targets_for("multi_hot"))
    assert all(((w > 0).sum(0) <= 2).all() for w in callback.weights)
    assert "tuple_size=2, alpha=0.2, the defaults for multi-hot targets" in caplog.text
    whole, _ = fit("multi_hot", targets_for("multi_hot"), tuple_size=4, alpha=1.0)  # set: batches of 4, whole
    assert all(((w > 0).sum(0) == 4).all() for w in whole.weights)
    single, _ = fit("one_hot_bce", targets_for("one_hot_bce"))  # single labels keep the paper's settings
    assert all(((w > 0).sum(0) == 4).all() for w in single.weights)

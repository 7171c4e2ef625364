"""The MultiMix objective (the one function the callback runs) against losses written out in the test."""

import math

import pytest
import torch
from torch import nn

from lightning_multimix import TeacherOutputs, mixup_objective, multimix_objective
from lightning_multimix.dense import attention_from_scores, class_scores, dense_weights
from lightning_multimix.sampling import dirichlet_weights


def eye(labels, c=3):
    return torch.eye(c)[labels]


def written_out(logits, targets):
    """``mean_k -sum_c t_kc log softmax(l_k)_c`` for rows ``(n, c)``."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(5, 3)
    embeddings = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    weights = torch.distributions.Dirichlet(torch.ones(6)).sample((40,)).T
    return head, embeddings, labels, weights


def test_two_examples_one_tuple_by_hand():
    # identity head: the logits are the interpolated embedding (0.5, 1.5); targets (0.25, 0.75)
    embeddings, labels, weights = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]), torch.tensor([[0.25],
                                                                                                              [0.75]])
    log_z = math.log(math.exp(0.5) + math.exp(1.5))
    expected = -(0.25 * (0.5 - log_z) + 0.75 * (1.5 - log_z))
    loss = multimix_objective(weights, labels, embeddings=embeddings, head=lambda z: z)
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(multimix_objective(weights, labels, logits=embeddings), torch.tensor(expected))


def test_logit_space_equals_embedding_space_in_value_and_gradient(batch):
    head, embeddings, labels, weights = batch
    params = [embeddings, head.weight, head.bias]
    by_embedding = multimix_objective(weights, labels, embeddings=embeddings, head=head)
    by_logits = multimix_objective(weights, labels, logits=head(embeddings))
    torch.testing.assert_close(by_logits, by_embedding)
    for a, b in zip(torch.autograd.grad(by_logits, params), torch.autograd.grad(by_embedding, params)):
        torch.testing.assert_close(a, b)
    expected = written_out(head(weights.T @ embeddings), weights.T @ eye(labels))
    torch.testing.assert_close(by_embedding, expected)


def test_label_smoothing(batch):
    head, embeddings, labels, weights = batch
    targets = 0.8 * (weights.T @ eye(labels)) + 0.2 / 3
    expected = written_out(head(weights.T @ embeddings), targets)
    torch.testing.assert_close(multimix_objective(weights, labels, logits=head(embeddings), label_smoothing=0.2),
                               expected)


@pytest.mark.parametrize("space", ["logits", "embeddings"])
def test_teacher_probs_targets(batch, space):
    head, embeddings, labels, weights = batch
    teacher_logits = torch.randn(6, 3)
    teacher = TeacherOutputs(logits=teacher_logits, weight=0.4, temperature=2.0)
    per_example = 0.6 * eye(labels) + 0.4 * torch.softmax(teacher_logits / 2.0, -1)
    expected = written_out(head(weights.T @ embeddings), weights.T @ per_example)
    given = {"logits": head(embeddings)} if space == "logits" else {"embeddings": embeddings, "head": head}
    torch.testing.assert_close(multimix_objective(weights, labels, teacher=teacher, **given), expected)


@pytest.mark.parametrize("space", ["logits", "embeddings"])
def test_teacher_logits_targets_predict_the_interpolated_embeddings(batch, space):
    head, embeddings, labels, weights = batch
    teacher_head, teacher_z = nn.Linear(5, 3), torch.randn(6, 5)
    mixed_teacher = torch.softmax(teacher_head(weights.T @ teacher_z) / 0.5, -1)  # the teacher on ITS interpolations
    targets = 0.7 * (weights.T @ eye(labels)) + 0.3 * mixed_teacher
    expected = written_out(head(weights.T @ embeddings), targets)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_z)
    by_logits = TeacherOutputs(logits=teacher_logits, weight=0.3, temperature=0.5, targets="logits")
    by_head = TeacherOutputs(logits=teacher_logits, weight=0.3, temperature=0.5, targets="logits",
                             embeddings=teacher_z, head=teacher_head)
    given = {"logits": head(embeddings)} if space == "logits" else {"embeddings": embeddings, "head": head}
    for teacher in (by_logits, by_head):  # an affine teacher head: both ways agree
        torch.testing.assert_close(multimix_objective(weights, labels, teacher=teacher, **given), expected)


def test_dense_by_hand_through_per_position_weights():
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(4, 3)
    features, labels = torch.randn(5, 6, 4, generator=g), torch.tensor([0, 1, 2, 1, 0])
    weights = torch.distributions.Dirichlet(torch.ones(5)).sample((9,)).T
    attention = attention_from_scores(class_scores(features, head.weight, labels), "cam")
    w = dense_weights(weights, attention)  # (m, n, r)
    mixed = torch.einsum("mnr,mrd->nrd", w, features)
    targets = torch.einsum("mnr,mc->nrc", w, eye(labels))
    expected = written_out(head(mixed), targets)
    torch.testing.assert_close(multimix_objective(weights, labels, feature_map=features, head=head), expected)
    # the embedding-space path (affine_head=False) gives the same
    torch.testing.assert_close(multimix_objective(weights, labels, feature_map=features, head=head,
                                                  affine_head=False), expected)


def test_mixup_objective_by_hand():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    lam, partner = torch.tensor(0.3), torch.tensor([2, 0, 3, 1])
    targets = 0.3 * eye(labels) + 0.7 * eye(labels)[partner]
    torch.testing.assert_close(mixup_objective(logits, labels, lam, partner), written_out(logits, targets))
    teacher = TeacherOutputs(logits=torch.randn(4, 3), weight=0.5)
    expected = written_out(logits, 0.5 * targets + 0.5 * torch.softmax(teacher.logits, -1))
    torch.testing.assert_close(mixup_objective(logits, labels, lam, partner, teacher=teacher), expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mixup_objective_is_the_soft_cross_entropy_of_the_mixed_one_hot_targets(smoothing):
    """The loss and its gradient equal the written-out soft cross-entropy of the mixed (smoothed) one-hot targets,
    for labels of any integer dtype."""
    g = torch.Generator().manual_seed(1)
    lam, partner = torch.tensor(0.3, dtype=torch.float64), torch.tensor([2, 0, 3, 1, 5, 4])
    for labels in (torch.tensor([0, 1, 2, 1, 2, 0]), torch.tensor([0, 1, 2, 1, 2, 0], dtype=torch.int32)):
        logits = torch.randn(6, 3, generator=g, requires_grad=True)
        rows = eye(labels.long())
        targets = 0.3 * rows + 0.7 * rows[partner]
        expected = written_out(logits, (1 - smoothing) * targets + smoothing / 3)
        loss = mixup_objective(logits, labels, lam, partner, label_smoothing=smoothing)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mixup_objective_leaves_out_the_ignore_index_in_each_label_term(smoothing):
    """Each of the two terms averages over its own labels that are not ``ignore_index``, as ``F.cross_entropy``."""
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    labels, partner, lam = torch.tensor([0, -100, 2, 1, -100, 0]), torch.tensor([2, 0, 3, 1, 5, 4]), 0.3
    log_p = torch.log_softmax(logits, -1)

    def term(ys: torch.Tensor) -> torch.Tensor:  # mean over the labelled rows of the smoothed cross-entropy
        rows = [i for i in range(6) if ys[i] >= 0]
        return sum(-(1 - smoothing) * log_p[i, ys[i]] - smoothing * log_p[i].mean() for i in rows) / len(rows)

    expected = lam * term(labels) + (1 - lam) * term(labels[partner])
    loss = mixup_objective(logits, labels, torch.tensor(lam), partner, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "pass `logits`"),
    (dict(logits=torch.zeros(6, 3), embeddings=torch.zeros(6, 5), head=nn.Linear(5, 3)), "not both"),
    (dict(embeddings=torch.zeros(6, 5)), "pass `logits`"),
    (dict(logits=torch.zeros(5, 3)), "5 rows but there are 6 labels"),
    (dict(logits=torch.zeros(6, 3), attention="softmax"), "dense mode only"),
    (dict(feature_map=torch.zeros(6, 2, 5), logits=torch.zeros(6, 3), head=nn.Linear(5, 3)), "not `logits`"),
    (dict(feature_map=torch.zeros(6, 2, 5), head=nn.Linear(5, 3),
          teacher=TeacherOutputs(logits=torch.zeros(6, 3), weight=0.5, targets="logits")), "targets='probs' only"),
])
def test_argument_errors(kwargs, match):
    weights = torch.full((6, 4), 1 / 6)
    with pytest.raises(ValueError, match=match):
        multimix_objective(weights, torch.zeros(6, dtype=torch.long), **kwargs)


def test_labels_must_be_integers_one_per_row():
    with pytest.raises(ValueError, match=r"`labels` must be \(6,\) integers"):
        multimix_objective(torch.full((6, 4), 1 / 6), torch.zeros(6), logits=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="both `embeddings` and `head`"):
        TeacherOutputs(logits=torch.zeros(2, 3), weight=0.5, embeddings=torch.zeros(2, 4))


@pytest.mark.parametrize("attention", ["cam", "softmax", "uniform"])
def test_dense_with_an_ignored_label_equals_dense_on_the_kept_examples(attention):
    """An example labelled -100 drawn with weight 0 (`keep`): the dense loss is the dense loss of the other examples
    alone."""
    torch.manual_seed(0)
    head = nn.Linear(6, 3)
    features, labels = torch.randn(4, 5, 6), torch.tensor([0, -100, 2, 1])
    keep = labels != -100
    weights = dirichlet_weights(4, 7, keep=keep, generator=torch.Generator().manual_seed(0))
    assert (weights[1] == 0).all()
    loss = multimix_objective(weights, labels, feature_map=features, head=head, attention=attention)
    kept = weights[keep] / weights[keep].sum(0, keepdim=True)
    expected = multimix_objective(kept, labels[keep], feature_map=features[keep], head=head, attention=attention)
    torch.testing.assert_close(loss, expected)

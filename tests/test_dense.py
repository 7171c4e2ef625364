"""Dense MultiMix: per-position interpolation of the feature map weighted by attention (issue 3).

Expectations are written out by hand (arithmetic in the test) or are invariants (uniform weights give the head on the
mean map, a 1x1 map gives plain MultiMix, the two exact paths agree), never a second call of the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_multimix import Dense, MultiMix, MultiMixError, MultiMixMixin, SelfDistillation
from lightning_multimix.dense import (
    attention_from_scores,
    class_scores,
    dense_interpolate,
    dense_multimix_loss,
    dense_weights,
    position_linear,
)
from helpers_models import Classifier, PooledHead, Recording, TinyConv, loader, quiet_trainer, soft_ce


def logit_reference(position_logits: Tensor, targets: Tensor, weights: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The dense loss of per-position logits ``(m, r, c)``, written out: the ``(m, n, r)`` weights mix the logits and
    the targets at each position; the soft cross-entropy of the smoothed mixed targets, averaged over ``(n, r)``."""
    c = targets.shape[-1]
    mixed_logits = torch.einsum("mnr,mrc->nrc", weights, position_logits)
    mixed_targets = (1 - label_smoothing) * torch.einsum("mnr,mc->nrc", weights, targets) + label_smoothing / c
    return soft_ce(mixed_logits.reshape(-1, c), mixed_targets.reshape(-1, c))

# ------------------------------------------------------------------------------------ a map small enough to do by hand
#
# 2 examples, 2x2 = 4 positions, 2 channels; the head is the identity (W = I, no bias), labels (0, 1).
#   F_0 = [1,0] [0,1] [2,0] [0,0]      scores s_0j = F_0j[0] = 1 0 2 0   cam a_0 = 1/3 0 2/3 0
#   F_1 = [0,1] [1,0] [0,0] [0,2]      scores s_1j = F_1j[1] = 1 0 0 2   cam a_1 = 1/3 0 0 2/3
# tuple 0, lambda = (1/4, 3/4): w_0j = 1/12 0 1/6 0, w_1j = 1/4 0 0 1/2, normalised per position:
#   j=0: (1/4, 3/4)   j=1: both zero -> lambda (1/4, 3/4)   j=2: (1, 0)   j=3: (0, 1)
#   mixed features = logits: [1/4, 3/4] [3/4, 1/4] [2, 0] [0, 2]; targets: (1/4,3/4) (1/4,3/4) (1,0) (0,1)
# tuple 1, lambda = (1, 0): example 0 alone wherever it has attention, lambda (1, 0) elsewhere -> F_0, targets (1, 0)
#   logits [1,0] [0,1] [2,0] [0,0]

HAND_FEATURES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]],
                              [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]])
HAND_LABELS = torch.tensor([0, 1])
HAND_LAMBDA = torch.tensor([[0.25, 1.0], [0.75, 0.0]])


def ce2(logit0: float, logit1: float, target0: float) -> float:
    """Cross-entropy of two logits against the target (target0, 1 - target0), by hand."""
    lse = math.log(math.exp(logit0) + math.exp(logit1))
    return lse - (target0 * logit0 + (1.0 - target0) * logit1)


HAND_LOSS = (
    ce2(0.25, 0.75, 0.25) + ce2(0.75, 0.25, 0.25) + ce2(2.0, 0.0, 1.0) + ce2(0.0, 2.0, 0.0)  # tuple 0
    + ce2(1.0, 0.0, 1.0) + ce2(0.0, 1.0, 1.0) + ce2(2.0, 0.0, 1.0) + ce2(0.0, 0.0, 1.0)  # tuple 1
) / 8  # n * r = 2 * 4 terms


def test_hand_computed_attention_weights_and_loss():
    attention = attention_from_scores(class_scores(HAND_FEATURES, torch.eye(2), HAND_LABELS), "cam")
    torch.testing.assert_close(attention, torch.tensor([[1 / 3, 0, 2 / 3, 0], [1 / 3, 0, 0, 2 / 3]]))
    weights = dense_weights(HAND_LAMBDA, attention)
    assert weights.shape == (2, 2, 4)  # (m, n, r)
    torch.testing.assert_close(weights[0], torch.tensor([[0.25, 0.25, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(weights[1], 1 - weights[0])
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    targets = torch.eye(2)[HAND_LABELS]
    expected = torch.tensor(HAND_LOSS)
    torch.testing.assert_close(dense_multimix_loss(HAND_FEATURES, targets, weights, head), expected)
    torch.testing.assert_close(logit_reference(head(HAND_FEATURES), targets, weights), expected)


def test_hand_computed_loss_through_the_callback():
    """The same numbers through a real Trainer: the input is the feature map, pooled and fed to an identity head."""
    net = PooledHead(channels=2, num_classes=2)
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(2))
        net.fc.bias.zero_()
    # (m, r, d) -> (b, d, h, w): position j = 2 * row + column
    x = HAND_FEATURES.transpose(1, 2).reshape(2, 2, 2, 2)
    callback = Recording(dense=Dense(attention="cam"), weights=lambda m: HAND_LAMBDA)
    quiet_trainer([callback], max_steps=1).fit(Classifier(net), loader(x, HAND_LABELS, batch_size=2))
    assert callback.feature_map_spec == ("net.pool", "input")
    torch.testing.assert_close(callback.losses[0], torch.tensor(HAND_LOSS))


# ----------------------------------------------------------------------------------------------- attention and weights


@pytest.mark.parametrize("kind", ["cam", "softmax", "uniform"])
def test_attention_rows_on_the_simplex(kind):
    scores = torch.randn(6, 9, generator=torch.Generator().manual_seed(0)) * 3
    scores[0] = -torch.rand(9)  # nothing positive: cam falls back to uniform
    scores[1] = 0.0
    attention = attention_from_scores(scores.requires_grad_(), kind)
    assert not attention.requires_grad  # a weighting, not a path for gradients
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(6))
    if kind == "cam":
        relu = scores.detach().clamp_min(0)
        torch.testing.assert_close(attention[2:], relu[2:] / relu[2:].sum(-1, keepdim=True))
        torch.testing.assert_close(attention[:2], torch.full((2, 9), 1 / 9))
    elif kind == "softmax":
        e = scores.detach().exp()
        torch.testing.assert_close(attention, e / e.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(attention, torch.full((6, 9), 1 / 9))


def test_unknown_attention_rejected():
    with pytest.raises(ValueError, match="Unknown attention 'gradcam'"):
        attention_from_scores(torch.zeros(2, 3), "gradcam")
    with pytest.raises(ValueError, match="attention"):
        MultiMix(dense=Dense(attention="gradcam"))


def test_dense_weights_on_the_simplex_at_every_position():
    g = torch.Generator().manual_seed(1)
    lam = torch.rand(5, 7, generator=g)
    lam[:2, :3] = 0.0  # tuples that leave examples out (tuple_size)
    lam = lam / lam.sum(0, keepdim=True)
    attention = torch.rand(5, 4, generator=g)
    attention[:, 0] = 0.0  # a position where nobody has attention: falls back to lambda
    attention[2:, 1] = 0.0  # a position where only examples 0 and 1 have attention
    attention = attention / attention.sum(-1, keepdim=True)
    w = dense_weights(lam, attention)
    assert w.shape == (5, 7, 4) and (w >= 0).all()
    torch.testing.assert_close(w.sum(0), torch.ones(7, 4))
    torch.testing.assert_close(w[:, :, 0], lam)
    # tuples 0..2 have lambda = 0 on examples 0 and 1, the only ones with attention at position 1: fallback to lambda
    torch.testing.assert_close(w[:, :3, 1], lam[:, :3])
    raw = lam[:, 3:, None] * attention[:, None, 2:]
    torch.testing.assert_close(w[:, 3:, 2:], raw / raw.sum(0, keepdim=True))


def test_dense_weights_give_padding_nothing():
    lam = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
    attention = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    w = dense_weights(lam, attention, mask)
    # position 0: only example 0 attends (example 1's zero attention is floored to a negligible weight); position 1:
    # only example 1 is not padding; position 2: example 0 alone is not padding and has no attention: all its weight
    torch.testing.assert_close(w[:, 0], torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    # tuple 1 has no weight on example 1, the only one not padding at position 1: that mixed position is all zero
    torch.testing.assert_close(w[:, 1], torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(w.sum(0) > 0, torch.tensor([[True, True, True], [True, False, True]]))


def test_all_zero_attention_gives_finite_loss_and_gradients():
    features = torch.randn(3, 4, 5)
    features[0] = 0.0  # example 0: zero scores everywhere, cam all zero -> uniform
    features[:, 2] = 0.0  # position 2: zero for every example
    features.requires_grad_()
    head = nn.Linear(5, 3)
    labels = torch.tensor([0, 1, 2])
    attention = attention_from_scores(class_scores(features, head.weight, labels), "cam")
    torch.testing.assert_close(attention[0], torch.full((4,), 0.25))
    weights = dense_weights(torch.full((3, 6), 1 / 3), attention)
    loss = dense_multimix_loss(features, torch.eye(3)[labels], weights, head)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all() and torch.isfinite(head.weight.grad).all()


def test_all_zero_feature_map_through_the_callback():
    x = torch.zeros(4, 2, 2, 2)  # relu(features) = 0 for every example: every cam row falls back to uniform
    net = PooledHead(channels=2, num_classes=3)
    callback = Recording(dense=Dense(), n_tuples=5, seed=0)
    quiet_trainer([callback], max_steps=1).fit(Classifier(net), loader(x, torch.tensor([0, 1, 2, 0]), batch_size=4))
    assert torch.isfinite(callback.losses[0])
    assert all(torch.isfinite(g).all() for g in callback.grads.values())


# ------------------------------------------------------------------------------------------------- the two exact paths


def test_logit_path_equals_embedding_path_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    m, n, r, d, c = 4, 9, 6, 5, 3
    head = nn.Linear(d, c)
    labels = torch.tensor([0, 2, 1, 2])
    lam = torch.distributions.Dirichlet(torch.ones(m)).sample((n,)).T
    raw_features = torch.randn(m, r, d, generator=g)
    attention = attention_from_scores(class_scores(raw_features, head.weight, labels), "cam")
    weights = dense_weights(lam, attention)
    targets = torch.eye(c)[labels]

    def grads(logit_path: bool) -> tuple[Tensor, ...]:
        features = raw_features.clone().requires_grad_()
        head.zero_grad()
        if logit_path:
            loss = logit_reference(head(features), targets, weights)
        else:
            loss = dense_multimix_loss(features, targets, weights, head)
        loss.backward()
        return loss.detach(), features.grad, head.weight.grad.clone(), head.bias.grad.clone()

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_logit_space_and_embedding_space_agree_through_the_callback():
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 1])
    runs = {}
    for space in ("auto", "never"):
        torch.manual_seed(0)
        callback = Recording(dense=Dense(), n_tuples=12, seed=3, logit_space=space)
        quiet_trainer([callback], max_steps=1).fit(Classifier(TinyConv()), loader(x, y, batch_size=4))
        runs[space] = callback
    torch.testing.assert_close(runs["auto"].losses[0], runs["never"].losses[0], atol=1e-6, rtol=1e-5)
    assert runs["auto"].grads.keys() == runs["never"].grads.keys()
    for name, grad in runs["auto"].grads.items():
        torch.testing.assert_close(grad, runs["never"].grads[name], atol=1e-6, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, Tensor):
                self.largest = max(self.largest, o.numel())
        return out


class MapCopies(TorchDispatchMode):
    """Records the size of every tensor a copying aten op (clone, copy_, _to_copy) produces."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("layout", ["cnn map", "tokens"])
@pytest.mark.parametrize("bias", [True, False])
def test_position_linear_is_the_head_at_every_position_without_copying_the_map(layout, bias):
    """Values and gradients of the written-out sum over channels; a CNN map (m, d, h, w), read as its (m, r, d) view,
    is never copied, forward or backward."""
    m, d, c = 3, 5, 4
    source = torch.randn(m, d, 2, 3) if layout == "cnn map" else torch.randn(m, 6, d)
    source.requires_grad_()
    head = nn.Linear(d, c, bias=bias)
    view = source.flatten(2).transpose(1, 2) if layout == "cnn map" else source  # (m, r, d)
    with MapCopies() as copies:
        out = position_linear(view, head.weight, head.bias)
        grad_out = torch.randn(out.shape)
        (out * grad_out).sum().backward()
    assert out.shape == (m, 6, c)
    if layout == "cnn map":
        assert source.numel() not in copies.sizes, copies.sizes
    got = [source.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    for p in (source, *head.parameters()):
        p.grad = None
    view = source.flatten(2).transpose(1, 2) if layout == "cnn map" else source
    expected = sum(view[..., k, None] * head.weight[:, k] for k in range(d)) + (head.bias if bias else 0.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    (expected * grad_out).sum().backward()
    for mine, theirs in zip(got, [source.grad, head.weight.grad] + ([head.bias.grad] if bias else [])):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_no_m_n_r_d_tensor_forward_or_backward():
    m, n, r, d, c = 8, 50, 16, 32, 10  # m*n*r*c = 64000 and m*n*r*d = 204800 exceed every legitimate tensor
    features = torch.randn(m, r, d, requires_grad=True)
    head = nn.Linear(d, c)
    labels = torch.arange(m) % c
    lam = torch.distributions.Dirichlet(torch.ones(m)).sample((n,)).T
    with LargestTensor() as logit_path:
        weights = dense_weights(lam, attention_from_scores(class_scores(features, head.weight, labels)))
        logit_reference(head(features), torch.eye(c)[labels], weights).backward()
    assert logit_path.largest <= max(m * n * r, n * r * c, m * r * d), logit_path.largest
    with LargestTensor() as embedding_path:
        dense_multimix_loss(features, torch.eye(c)[labels], weights, head).backward()
    assert embedding_path.largest <= max(m * n * r, n * r * d), embedding_path.largest


def test_interpolation_stays_float32_under_bf16_autocast():
    lam = torch.distributions.Dirichlet(torch.ones(3)).sample((7,)).T
    weights = dense_weights(lam, attention_from_scores(torch.randn(3, 5), "softmax"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        targets = dense_interpolate(torch.eye(4)[:3, None].expand(-1, 5, -1), weights)  # every position's
        mixed = dense_interpolate(torch.randn(3, 5, 4).bfloat16(), weights)
    assert targets.dtype == mixed.dtype == torch.float32
    torch.testing.assert_close(targets.sum(-1), torch.ones(7, 5))


# ------------------------------------------------------------------------------------- invariants through the callback


def test_uniform_attention_with_huge_alpha_is_the_head_on_the_mean_map():
    """weights ~ 1/m: at every position the head sees the batch's mean feature, the target is the mean one-hot."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 2, 2, generator=g), torch.tensor([0, 1, 1, 2])
    net = PooledHead(channels=3, num_classes=3)
    callback = Recording(dense=Dense(attention="uniform"), alpha=1e6, n_tuples=5, seed=0)
    w_fc, b_fc = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    quiet_trainer([callback], max_steps=1).fit(Classifier(net), loader(x, y, batch_size=4))
    torch.testing.assert_close(callback.drawn[0], torch.full((4, 5), 0.25), atol=1e-2, rtol=0)
    mean_map = x.mean(0).flatten(1).T  # (r, d)
    logits = mean_map @ w_fc.T + b_fc  # the head at every position
    target = torch.tensor([0.25, 0.5, 0.25]).expand(4, 3)
    torch.testing.assert_close(callback.losses[0], soft_ce(logits, target), atol=1e-3, rtol=0)


def test_one_position_map_is_plain_multimix():
    """With r = 1 every attention is 1: dense MultiMix must be plain MultiMix with the same weights."""
    x, y = torch.randn(4, 2, 1, 1), torch.tensor([0, 1, 2, 1])
    losses = {}
    for dense in (False, True):
        torch.manual_seed(0)
        callback = Recording(dense=Dense() if dense else None, n_tuples=10, seed=5)
        quiet_trainer([callback], max_steps=2).fit(Classifier(TinyConv()), loader(x, y, batch_size=2))
        losses[dense] = torch.stack(callback.losses)
    torch.testing.assert_close(losses[True], losses[False])


class PooledMLP(nn.Module):
    """The input is the feature map; pooled, then a non-linear head (optionally with batch norm, which wants 2-d)."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        norm = [nn.BatchNorm1d(5)] if batch_norm else []
        self.head = nn.Sequential(nn.Linear(3, 5), *norm, nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(x).flatten(1))


def test_non_linear_head_by_hand():
    """Softmax attention from the head's own-class logit at each position, the head on the mixed map (n*r rows)."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 3, 2, 3, generator=g), torch.tensor([2, 0, 1])
    lam = torch.tensor([[0.2, 0.5], [0.3, 0.5], [0.5, 0.0]])
    net = PooledMLP()
    head = copy.deepcopy(net.head)  # the head's initial weights, for the hand computation
    callback = Recording(dense=Dense(attention="softmax"), head="net.head", weights=lambda m: lam)
    with torch.no_grad():
        features = x.flatten(2).transpose(1, 2)  # (m, r, d)
        scores = torch.stack([head(features[i])[:, y[i]] for i in range(3)])  # (m, r)
        attention = scores.exp() / scores.exp().sum(1, keepdim=True)
        raw = lam[:, :, None] * attention[:, None, :]  # (m, n, r)
        w = raw / raw.sum(0, keepdim=True)
        mixed = (w[..., None] * features[:, None]).sum(0)  # (n, r, d)
        targets = (w[..., None] * torch.eye(3)[y][:, None, None]).sum(0)  # (n, r, c)
        expected = soft_ce(head(mixed), targets)
    quiet_trainer([callback], max_steps=1).fit(Classifier(net), loader(x, y, batch_size=3))
    torch.testing.assert_close(callback.losses[0], expected)


def test_non_linear_head_with_batch_norm_runs():
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    callback = Recording(dense=Dense(), n_tuples=5, seed=0, head="net.head")
    quiet_trainer([callback], max_steps=2).fit(Classifier(PooledMLP(batch_norm=True)), loader(x, y, batch_size=4))
    assert all(torch.isfinite(loss) for loss in callback.losses)


# --------------------------------------------------------------------------------------------- finding the feature map


class MLPAfterPool(nn.Module):
    """avgpool -> Linear -> ReLU -> fc: the pooled map is not the head's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(self.pool(self.conv(x))))


class FunctionalMean(nn.Module):
    """No pooling module: the mean is taken functionally, so auto-detection finds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class DeclaresMap(MultiMixMixin, Classifier):
    def multimix_feature_map(self) -> nn.Module:
        return self.net.features


def images(b: int = 4) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 2, 4, 4), torch.arange(b) % 3


def test_mismatched_feature_map_raises_before_any_update():
    module = Classifier(MLPAfterPool())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MultiMixError, match=r"does not match the head's input .*Dense\(feature_map='dotted.path'\)"):
        quiet_trainer([MultiMix(dense=Dense(), n_tuples=4)], max_steps=1).fit(module, loader(*images(), batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # no silent fallback, no step


def test_no_pooling_found_raises():
    with pytest.raises(MultiMixError, match="found no average pooling"):
        quiet_trainer([MultiMix(dense=Dense())], max_steps=1).fit(Classifier(FunctionalMean()), loader(*images(), 4))


def test_declared_feature_map_mixin_and_argument():
    x, y = images()
    losses = []
    for module, callback in (
        (DeclaresMap(FunctionalMean()), Recording(dense=Dense(), n_tuples=6, seed=1)),
        (Classifier(FunctionalMean()), Recording(dense=Dense(feature_map="net.features"), n_tuples=6, seed=1)),
    ):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            module.net.load_state_dict(FunctionalMean().state_dict())
        quiet_trainer([callback], max_steps=1).fit(module, loader(x, y, batch_size=4))
        assert callback.feature_map_spec == ("net.features", "output")
        losses.append(callback.losses[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_wrong_feature_map_path_is_a_clear_error():
    with pytest.raises(MultiMixError, match="No submodule 'net.nope'"):
        quiet_trainer([MultiMix(dense=Dense(feature_map="net.nope"))], max_steps=1).fit(
            Classifier(TinyConv()), loader(*images(), batch_size=4)
        )


class Conv1dNet(nn.Module):
    """A sequence model pooled by AdaptiveAvgPool1d: its pooling input is (b, d, l), channels first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_avgpool1d_map_is_read_channels_first():
    callback = Recording(dense=Dense(), n_tuples=6, seed=0)
    x, y = torch.randn(4, 2, 7), torch.tensor([0, 1, 2, 0])
    quiet_trainer([callback], max_steps=1).fit(Classifier(Conv1dNet()), loader(x, y, batch_size=4))
    assert callback.feature_map_spec == ("net.pool", "input") and torch.isfinite(callback.losses[0])


def test_bf16_mixed_dense_runs():
    x, y = images(8)
    callback = Recording(dense=Dense(), n_tuples=8, seed=0)
    quiet_trainer([callback], max_steps=2, precision="bf16-mixed").fit(Classifier(TinyConv()), loader(x, y, 4))
    assert all(torch.isfinite(loss) for loss in callback.losses)
    assert all(torch.isfinite(g).all() for g in callback.grads.values())


def test_dense_with_logit_distillation_rejected():
    with pytest.raises(ValueError, match=r"SelfDistillation\(targets='logits'\).*with `Dense`.*targets='probs'"):
        MultiMix(dense=Dense(), distill=SelfDistillation(targets="logits"))


def test_factorised_dense_loss_equals_the_per_position_weights_path():
    """The fast path (no m x n x r tensor) against the explicit per-position weights, values and gradients, with a
    position where no selected example has attention (the plain-weights fallback)."""
    from lightning_multimix.dense import factorised_dense_logit_loss
    from lightning_multimix.targets import smooth_

    torch.manual_seed(0)
    m, n, r, c = 5, 7, 4, 3
    logits = torch.randn(m, r, c, requires_grad=True)
    targets = torch.eye(c)[torch.tensor([0, 1, 2, 0, 1])]
    weights = torch.distributions.Dirichlet(torch.ones(m)).sample((n,)).T
    weights[:, 0] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5])  # tuple 0 uses examples 3 and 4 only
    attention = torch.rand(m, r)
    attention[3:, 1] = 0.0  # ... which have no attention at position 1
    reference = logit_reference(logits, targets, dense_weights(weights, attention), label_smoothing=0.1)
    fast = factorised_dense_logit_loss(logits, smooth_(targets.clone(), 0.1, c), weights, attention)
    torch.testing.assert_close(fast, reference)
    (g_ref,) = torch.autograd.grad(reference, logits)
    (g_fast,) = torch.autograd.grad(fast, logits)
    torch.testing.assert_close(g_fast, g_ref)

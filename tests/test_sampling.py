"""Weight matrices: simplex columns, Dirichlet/Beta moments, generator ownership, pairs structure."""

import math

import pytest
import torch

from lightning_multimix import sampling
from lightning_multimix.sampling import RandomStream, dirichlet_weights, log_gamma, pair_weights, step_seed


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_dirichlet_columns_lie_on_the_simplex(alpha):
    weights = dirichlet_weights(7, 500, alpha, generator=_gen())
    assert weights.shape == (7, 500)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(500))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_dirichlet_marginal_moments(alpha):
    # the marginal of a Dirichlet(alpha * 1_m) coordinate is Beta(alpha, (m - 1) * alpha)
    m, n = 4, 200_000
    weights = dirichlet_weights(m, n, alpha, generator=_gen(1))
    a, b = alpha, (m - 1) * alpha
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    torch.testing.assert_close(weights.mean(1), torch.full((m,), mean), atol=3e-3, rtol=0)
    torch.testing.assert_close(weights.var(1), torch.full((m,), var), atol=0, rtol=3e-2)


@pytest.mark.parametrize("alpha", [0.7, 1.0])
def test_dirichlet_uses_only_its_generator(alpha):
    global_state = torch.get_rng_state()
    first = dirichlet_weights(5, 10, alpha, generator=_gen(3))
    assert torch.equal(torch.get_rng_state(), global_state), "the global RNG was touched"
    torch.testing.assert_close(first, dirichlet_weights(5, 10, alpha, generator=_gen(3)), rtol=0, atol=0)
    assert not torch.equal(first, dirichlet_weights(5, 10, alpha, generator=_gen(4)))


def test_dirichlet_one_is_normalised_exponentials_of_one_uniform_draw_each():
    """alpha = 1: each entry is -log U for one torch.rand draw U of the generator, normalised by its column; the
    generator moves on by exactly those draws."""
    one, other = _gen(2), _gen(2)
    uniform = torch.rand(128, 700, generator=one)
    exponentials = -torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny))
    weights = dirichlet_weights(128, 700, 1.0, generator=other)
    torch.testing.assert_close(weights, exponentials / exponentials.sum(0), rtol=1e-6, atol=0)
    assert torch.equal(torch.rand(3, generator=one), torch.rand(3, generator=other))
    x = exponentials.flatten().double().sort().values  # Exponential(1): Kolmogorov-Smirnov at the 1% level
    empirical = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    assert x.isfinite().all() and (empirical - (1 - torch.exp(-x))).abs().max() < 1.63 / math.sqrt(x.numel())


@pytest.mark.parametrize("alpha", [1e-3, 0.05])
def test_small_alpha_stays_a_dirichlet(alpha):
    """A small concentration: the columns are nearly one-hot, as torch.distributions.Dirichlet's; no column collapses
    to the uniform mean (float32 gammas underflow to zero there), and the largest weight's distribution matches."""
    m, n = 16, 20_000
    weights = dirichlet_weights(m, n, alpha, generator=_gen(4))
    torch.testing.assert_close(weights.sum(0), torch.ones(n))
    assert weights.isfinite().all() and (weights >= 0).all()
    torch.manual_seed(0)
    reference = torch.distributions.Dirichlet(torch.full((m,), alpha)).sample((n,)).T
    for ours, theirs in ((weights.amax(0), reference.amax(0)), (weights[0], reference[0])):
        assert abs(ours.mean().item() - theirs.mean().item()) < 0.01
        assert abs(ours.var().item() - theirs.var().item()) < 0.01
    assert (weights.amax(0) < 1.5 / m).sum() == 0  # no tuple is the batch mean


def test_log_gamma_is_the_log_of_gamma_draws():
    for concentration in (0.3, 1.0, 2.5):
        samples = log_gamma(concentration, (200_000,), generator=_gen(5)).exp()
        assert abs(samples.mean().item() - concentration) < 0.02 * concentration
        assert abs(samples.var().item() - concentration) < 0.05 * concentration


def test_keep_gives_left_out_examples_no_weight_and_a_dirichlet_over_the_others():
    keep = torch.tensor([True, False, True, True, False])
    weights = dirichlet_weights(5, 200_000, 1.0, keep=keep, generator=_gen(6))
    assert (weights[~keep] == 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(200_000))
    # the kept rows are Dirichlet(1, 1, 1): marginals Beta(1, 2), mean 1/3, variance 1/18
    torch.testing.assert_close(weights[keep].mean(1), torch.full((3,), 1 / 3), atol=3e-3, rtol=0)
    torch.testing.assert_close(weights[keep].var(1), torch.full((3,), 1 / 18), atol=0, rtol=3e-2)
    nothing = dirichlet_weights(3, 4, 1.0, keep=torch.zeros(3, dtype=torch.bool), generator=_gen(6))
    assert torch.equal(nothing, torch.zeros(3, 4))  # no example to mix: all zero, no NaN


def test_pair_weights_with_keep_renormalise_over_the_kept_examples():
    keep = torch.tensor([True, True, False, True])
    weights = pair_weights(4, 1.0, keep=keep, generator=_gen(3))
    full = pair_weights(4, 1.0, generator=_gen(3))
    assert (weights[2] == 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(4))
    for k in range(4):
        kept = full[:, k] * keep
        expected = kept / kept.sum() if kept.sum() > 0 else keep / keep.sum()
        torch.testing.assert_close(weights[:, k], expected.float())


def test_random_stream_is_a_pure_function_of_the_batch():
    stream, resumed = RandomStream(7), RandomStream(7, batches_seen=3)
    indices = [stream.next_batch() for _ in range(5)]
    assert indices == [0, 1, 2, 3, 4] and resumed.next_batch() == 3
    assert stream.coin(3, 0) == resumed.coin(3, 0) != stream.coin(3, 1)
    a, b = stream.seed(_gen(), 3, 0), resumed.seed(_gen(99), 3, 0)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_tuple_size_gives_m_examples_per_column():
    weights = dirichlet_weights(10, 300, 1.0, tuple_size=3, generator=_gen())
    assert ((weights > 0).sum(0) == 3).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(300))
    # the support is random: every example is used by some tuple
    assert ((weights > 0).sum(1) > 0).all()


def test_pair_weights_structure():
    m = 9
    weights = pair_weights(m, 1.0, generator=_gen(2))
    assert weights.shape == (m, m)
    torch.testing.assert_close(weights.sum(0), torch.ones(m))
    # each example appears once with lambda (its own column) and once with 1 - lambda (its partner's column)
    torch.testing.assert_close(weights.sum(1), torch.ones(m))
    assert ((weights > 0).sum(0) <= 2).all()
    lam = weights.diagonal()
    fixed_points = lam == 1.0
    assert torch.allclose(lam[~fixed_points], lam[~fixed_points][0].expand((~fixed_points).sum()))


def test_pair_lambda_follows_beta():
    # lambda ~ Beta(alpha, alpha): mean 1/2, variance 1 / (4 (2 alpha + 1))
    alpha = 0.4
    lams = []
    for seed in range(3000):
        w = pair_weights(3, alpha, generator=_gen(seed))
        off = w - torch.diag(w.diagonal())
        lams.append(w[0, 0].item() if off[:, 0].sum() > 0 else None)
    lams = torch.tensor([x for x in lams if x is not None])
    assert abs(lams.mean().item() - 0.5) < 0.03
    assert abs(lams.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.015


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_mixup_pairing_draws_lambda_from_beta_and_a_permutation(alpha):
    """lambda ~ Beta(alpha, alpha): in [0, 1], mean 1/2, variance 1 / (4 (2 alpha + 1)); for alpha = 1 (uniform) the
    empirical CDF within the Kolmogorov-Smirnov bound of the identity. partner: a permutation."""
    generator = _gen(11)
    draws = [sampling.mixup_pairing(6, alpha, generator=generator) for _ in range(4000)]
    lams = torch.stack([lam for lam, _ in draws]).double()
    assert lams.shape == (4000,) and ((lams >= 0) & (lams <= 1)).all()
    assert abs(lams.mean().item() - 0.5) < 0.02
    assert abs(lams.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.1 / (4 * (2 * alpha + 1))
    if alpha == 1.0:
        empirical = torch.arange(1, 4001, dtype=torch.float64) / 4000
        assert (empirical - lams.sort().values).abs().max() < 1.63 / math.sqrt(4000)
    assert all(sorted(partner.tolist()) == list(range(6)) for _, partner in draws)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dirichlet_weights(4, 0), "n_tuples"),
        (lambda: dirichlet_weights(0, 4), "num_examples"),
        (lambda: dirichlet_weights(4, 4, alpha=0.0), "alpha"),
        (lambda: dirichlet_weights(4, 4, alpha=float("nan")), "alpha"),
        (lambda: dirichlet_weights(4, 4, tuple_size=0), "tuple_size"),
        (lambda: pair_weights(1), "num_examples"),
    ],
)
def test_bad_arguments_raise_with_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_step_seeds_are_distinct_per_rank_and_step():
    seeds = {step_seed(42, rank, step) for rank in range(4) for step in range(1000)}
    assert len(seeds) == 4000
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(42, 0, 0) == step_seed(42, 0, 0)


def test_seed_uniform_is_uniform_over_step_seeds_and_apart_from_the_generator_they_seed():
    """The protocol's per-step coin: uniform over consecutive steps' seeds (Kolmogorov-Smirnov at the 1% level), a pure
    function of the seed, and unrelated to the first draw of the generator seeded with the same seed."""
    seeds = [step_seed(3, 0, step) for step in range(20_000)]
    coins = torch.tensor([sampling.seed_uniform(seed) for seed in seeds], dtype=torch.float64)
    assert ((coins >= 0) & (coins < 1)).all() and coins.unique().numel() == coins.numel()
    empirical = torch.arange(1, coins.numel() + 1, dtype=torch.float64) / coins.numel()
    assert (empirical - coins.sort().values).abs().max() < 1.63 / math.sqrt(coins.numel())
    assert [sampling.seed_uniform(seed) for seed in seeds[:5]] == coins[:5].tolist()
    first_draws = torch.stack([torch.rand((), generator=_gen(seed)) for seed in seeds[:2000]]).double()
    assert abs(torch.corrcoef(torch.stack((coins[:2000], first_draws)))[0, 1]) < 0.1  # 4.5 std of a null correlation

"""Weight matrices: simplex columns, Dirichlet/Beta moments, generator ownership, pairs structure."""

import math
import threading

import numpy as np
import pytest
import torch

from lightning_multimix import sampling
from lightning_multimix.sampling import dirichlet_weights, pair_weights, sample_gamma, standard_exponential, step_seed


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
    global_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = dirichlet_weights(5, 10, alpha, generator=_gen(3))
    assert torch.equal(torch.get_rng_state(), global_state), "the global RNG was touched"
    assert np.array_equal(np.random.get_state()[1], numpy_state), "NumPy's global RNG was touched"
    torch.testing.assert_close(first, dirichlet_weights(5, 10, alpha, generator=_gen(3)), rtol=0, atol=0)
    assert not torch.equal(first, dirichlet_weights(5, 10, alpha, generator=_gen(4)))


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_standard_exponential_is_exponential_on_the_uniform_grid(source):
    """Both sources give Exponential(1): the empirical CDF within the Kolmogorov-Smirnov bound of 1 - exp(-x), and
    U = exp(-x) on the source's grid (NumPy: the odd multiples of 2**-24; torch.rand: multiples of 2**-24), every draw
    finite."""
    draws = standard_exponential((401, 499), generator=_gen(7), source=source)  # odd count: a half-used last word
    assert draws.shape == (401, 499) and draws.dtype == torch.float32
    x = draws.flatten().double().sort().values
    tiny = torch.finfo(torch.float32).tiny
    assert x.min() >= 0 and x.max() <= (24 * math.log(2) + 1e-5 if source == "numpy" else -math.log(tiny) + 1e-3)
    empirical = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    assert (empirical - (1 - torch.exp(-x))).abs().max() < 1.63 / math.sqrt(x.numel())  # KS at the 1% level
    grid = (torch.exp(-x) * 2**24)[x < 15]  # leaves out a floored 0 of torch.rand
    assert ((grid - grid.round()).abs() <= 2e-6 * grid).all()  # off the grid by the float32 rounding of the log only
    assert grid.round().min() >= 1 and grid.round().max() <= 2**24
    if source == "numpy":  # where float32's log pins U down to the unit (the whole grid: the next test)
        small = grid[grid < 2**12].round()
        assert small.numel() > 10 and (small % 2 == 1).all(), "U lies on the midpoints of the 2**-23 grid"
    assert not torch.equal(draws, standard_exponential((401, 499), generator=_gen(8), source=source))
    torch.testing.assert_close(draws, standard_exponential((401, 499), generator=_gen(7), source=source), rtol=0,
                               atol=0)


def test_exponential_from_bits_over_every_mantissa():
    """All 2**23 values of the 23 bits used: -log((2k + 1) 2**-24) within 3 units in the last place of the float64
    value, decreasing in k, finite; the word's 9 high bits change nothing; the words are overwritten in place."""
    k = np.arange(2**23, dtype=np.uint32)
    expected = -np.log((2 * k.astype(np.float64) + 1) * 2.0**-24)
    words = k.copy()
    draws = sampling.exponential_from_bits(words)
    assert draws.dtype == np.float32 and np.shares_memory(draws, words)
    ulp = np.spacing(expected.astype(np.float32)).astype(np.float64)
    assert (np.abs(draws - expected) <= 3 * ulp).all()
    assert (np.diff(draws) <= 0).all() and np.isfinite(draws).all()
    assert draws[0] == np.float32(24 * math.log(2)) and draws[-1] == np.float32(2.0**-24)
    assert np.array_equal(sampling.exponential_from_bits(k | np.uint32(0xFF800000)), draws)
    with pytest.raises(ValueError, match="uint32 words, got dtype int32"):
        sampling.exponential_from_bits(np.zeros(3, dtype=np.int32))


class _Words(np.random.bit_generator.ISeedSequence):
    """A seed sequence that hands NumPy's SFC64 given words: NumPy's own seeding from them is the reference."""

    def __init__(self, words: np.ndarray) -> None:
        self.words = words

    def generate_state(self, n_words: int, dtype=np.uint32) -> np.ndarray:
        assert n_words == 3 and dtype == np.uint64
        return self.words


def test_sfc64_words_are_numpys_sfc64_seeded_by_three_words_from_the_generator():
    """The kept bit generator is re-seeded exactly as NumPy seeds a new SFC64 from the generator's next three 64-bit
    words, whatever it drew before and in whichever thread (each has its own)."""
    seed_words = torch.randint(-(2**63), 2**63 - 1, (3,), generator=_gen(5), dtype=torch.int64).numpy()
    expected = np.random.SFC64(_Words(seed_words.view(np.uint64))).random_raw(500).view(np.uint32)[:999]
    sampling._sfc64_words(4321, _gen(9))  # a draw before: the state it leaves behind must not matter
    assert np.array_equal(sampling._sfc64_words(999, _gen(5)), expected)
    in_thread = {}
    worker = threading.Thread(target=lambda: in_thread.update(words=sampling._sfc64_words(999, _gen(5))))
    worker.start()
    worker.join()
    assert np.array_equal(in_thread["words"], expected)
    generator = _gen(5)
    first, second = sampling._sfc64_words(999, generator), sampling._sfc64_words(999, generator)
    assert np.array_equal(first, expected) and not np.array_equal(second, expected)  # the generator moved on


def test_standard_exponential_auto_source_on_cpu_is_numpy_for_large_draws_and_numpy_needs_cpu():
    large = (2, sampling.NUMPY_MIN_DRAWS // 2)
    assert torch.equal(standard_exponential(large, generator=_gen(1)),
                       standard_exponential(large, generator=_gen(1), source="numpy"))
    assert torch.equal(standard_exponential((5, 7), generator=_gen(1)),
                       standard_exponential((5, 7), generator=_gen(1), source="torch"))
    with pytest.raises(ValueError, match="source='numpy' on meta"):
        standard_exponential((5, 7), device="meta", source="numpy")
    with pytest.raises(ValueError, match="source='philox'"):
        standard_exponential((5, 7), source="philox")


def test_dirichlet_one_is_the_normalised_standard_exponential_draws_of_the_same_generator():
    """alpha = 1: the columns are standard_exponential's draws (NumPy's way: the factor -1/log 2 it leaves out
    cancels) or torch.rand's (few draws), normalised; the generator moves on by the same draws."""
    for shape in ((128, sampling.NUMPY_MIN_DRAWS // 64), (7, 5)):
        one, other = _gen(2), _gen(2)
        exponentials = standard_exponential(shape, generator=one)
        weights = dirichlet_weights(*shape, 1.0, generator=other)
        torch.testing.assert_close(weights, exponentials / exponentials.sum(0), rtol=1e-6, atol=0)
        assert (weights > 0).all()
        assert torch.equal(torch.rand(3, generator=one), torch.rand(3, generator=other))


def test_tuple_size_gives_m_examples_per_column():
    weights = dirichlet_weights(10, 300, 1.0, tuple_size=3, generator=_gen())
    assert ((weights > 0).sum(0) == 3).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(300))
    # the support is random: every example is used by some tuple
    assert ((weights > 0).sum(1) > 0).all()


def test_gamma_fast_path_matches_the_gamma_mean_and_variance():
    for concentration in (1.0, 2.5):
        samples = sample_gamma(concentration, (200_000,), generator=_gen(5))
        assert abs(samples.mean().item() - concentration) < 0.02 * concentration
        assert abs(samples.var().item() - concentration) < 0.05 * concentration


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

"""Interpolation weights: the ``m x n`` matrices that define MultiMix and its pairs baseline.

Every sampler returns a weight matrix ``weights`` of shape ``(m, n)`` whose columns lie on the probability simplex:
column ``k`` holds the coefficients of the ``m`` examples in the ``k``-th interpolated example. Both modes share the
rest of the pipeline (:mod:`lightning_multimix.interpolation`, :mod:`lightning_multimix.losses`): a mode is a way of
drawing this matrix, nothing else.

All randomness comes from an explicit :class:`torch.Generator` on the target device (large draws on CPU take their bits
from a NumPy generator seeded from it, :func:`standard_exponential`); neither torch's nor NumPy's global RNG is ever
touched.
"""

from __future__ import annotations

import math
import threading
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
#: this thread's NumPy bit generator (:func:`_sfc64_words`), re-seeded at every draw
_THREAD = threading.local()
#: from this many draws on, ``source="auto"`` on CPU takes NumPy's bits and logarithm. In a loop they are faster from
#: about 2**13 draws, but inside a training step NumPy's code runs cold (``benchmarks/sampling.py``'s ``after a step``
#: column: 0.37 ms more than in a loop at ``128 x 100``, torch's way 0.18 ms more), and torch's way is faster up to
#: ``128 x 500`` (64,000 draws), NumPy's from ``128 x 1000``
NUMPY_MIN_DRAWS = 2**16
#: ``f - (1 - 2**-24) = (2k + 1) 2**-24`` exactly for ``f = 1 + k 2**-23``: the midpoints of the ``2**-23`` grid
_TO_MIDPOINT = np.float32(1 - 2**-24)


def _validate(num_examples: int, alpha: float, *, min_examples: int = 1) -> None:
    if not isinstance(num_examples, int) or num_examples < min_examples:
        raise ValueError(f"Expected `num_examples` to be an int >= {min_examples}, got {num_examples!r}.")
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"Expected `alpha` > 0 (the Dirichlet/Beta concentration), got {alpha!r}. Use e.g. alpha=1.0.")


def standard_exponential(
    shape: tuple[int, ...],
    *,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    source: Literal["auto", "numpy", "torch"] = "auto",
) -> Tensor:
    """``Exponential(1)`` float32 draws of the given shape, ``-log(U)`` with ``U`` uniform, from ``generator``.

    ``source="numpy"`` (CPU only): three 64-bit words drawn from ``generator`` seed NumPy's SFC64 generator, whose raw
    bits become the draws in place (:func:`exponential_from_bits`: ``U`` uniform on the midpoints of the ``2**-23``
    grid of ``(0, 1)``, every draw finite, at most ``24 log 2``, about 16.6). ``"torch"``: ``U`` from ``torch.rand``
    (the ``2**-24`` grid of ``[0, 1)``), an exact 0 floored at the smallest normal float. ``"auto"`` takes NumPy's
    way on CPU from :data:`NUMPY_MIN_DRAWS` draws on (``benchmarks/sampling.py``, right after a network's step: the
    ``128 x 1000`` Dirichlet draw about 1.1x, ``128 x 10000`` about 2x faster than with ``torch.rand``, whose
    generator is slower per bit and whose ``log`` is slower than NumPy's), ``torch.rand`` otherwise. Either way the
    draws are a pure function of the generator's state on a given machine (vectorised logarithms pick their code by
    the CPU's vector units, so the last bit may differ between machines), and each pass runs in place (no second
    array of the draws' size).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> e = standard_exponential((2, 3), generator=g)
        >>> e.shape, e.dtype, bool((e >= 0).all())
        (torch.Size([2, 3]), torch.float32, True)
    """
    count = math.prod(shape)
    device = _device(device, generator)
    if source not in ("auto", "numpy", "torch") or source == "numpy" and device.type != "cpu":
        raise ValueError(f"standard_exponential: source={source!r} on {device}; expected 'auto', 'torch', or "
                         "'numpy' (CPU only).")
    if source == "torch" or source == "auto" and not _numpy_way(count, device):
        uniform = torch.rand(shape, generator=generator, device=device)
        return uniform.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_()
    return torch.from_numpy(exponential_from_bits(_sfc64_words(count, generator))).view(shape)


def _device(device: Union[torch.device, str, None], generator: Optional[torch.Generator]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _numpy_way(count: int, device: torch.device) -> bool:
    """Whether ``source="auto"`` takes NumPy's way for ``count`` draws on ``device``."""
    return device.type == "cpu" and count >= NUMPY_MIN_DRAWS


def _sfc64_words(count: int, generator: Optional[torch.Generator]) -> np.ndarray:
    """``count`` random ``uint32`` words from NumPy's SFC64, seeded by three 64-bit draws from ``generator``.

    Seeded as NumPy seeds SFC64 from a seed sequence (the three words, a counter of 1, then 12 outputs dropped), but
    into one bit generator per thread that is kept: building a NumPy bit generator (and its ``SeedSequence``) at every
    draw cost 0.03-0.07 ms more right after a network's step (``benchmarks/sampling.py``: ``SFC64 seeded anew``
    against ``SFC64 bits, NumPy log2``, ``after a step``), 0.005 ms in a loop.
    """
    state = np.ones(4, dtype=np.uint64)  # the counter: 1
    state[:3] = torch.randint(-(2**63), 2**63 - 1, (3,), generator=generator, dtype=torch.int64).numpy().view(np.uint64)
    bits = getattr(_THREAD, "sfc64", None)
    if bits is None:
        bits = _THREAD.sfc64 = np.random.SFC64(0)
    bits.state = {"bit_generator": "SFC64", "state": {"state": state}, "has_uint32": 0, "uinteger": 0}
    bits.random_raw(12)
    return bits.random_raw((count + 1) // 2).view(np.uint32)[:count]


def exponential_from_bits(bits: np.ndarray) -> np.ndarray:
    """``Exponential(1)`` float32 draws from random ``uint32`` words, in place (the result shares their memory).

    The 23 low bits ``k`` of a word give ``U = (2k + 1) 2**-24``, uniform on the midpoints of the ``2**-23`` grid of
    ``(0, 1)`` (made exactly: a mantissa ``f = 1 + k 2**-23`` minus ``1 - 2**-24``), and the draw is ``-log(U)``,
    computed as ``log2(U) * -log(2)`` with NumPy's vectorised ``log2`` (``benchmarks/sampling.py``: the Dirichlet
    draw 1.7-1.9x faster than with ``torch.log`` of the same bits in a loop, 1.4-1.5x right after a network's step,
    at ``128 x 1000`` and ``128 x 10000``): within 3 units in the last place of ``-log(U)`` over the whole grid,
    decreasing in ``k``, every draw finite and in ``[2**-24, 24 log 2]`` (all checked in ``tests/test_sampling.py``).

    Example:
        >>> exponential_from_bits(np.array([0x7FFFFF, 0], dtype=np.uint32))  # U = 1 - 2**-24, U = 2**-24
        array([5.9604645e-08, 1.6635532e+01], dtype=float32)
    """
    log2_uniform = _log2_uniform_from_bits(bits)
    return np.multiply(log2_uniform, np.float32(-math.log(2)), out=log2_uniform)


def _log2_uniform_from_bits(bits: np.ndarray) -> np.ndarray:
    """``log2(U)`` in place, ``U`` made of the bits as in :func:`exponential_from_bits`: ``-E / log 2`` for the
    draw ``E`` that function returns (negative)."""
    if bits.dtype != np.uint32:
        raise ValueError(f"exponential_from_bits takes uint32 words, got dtype {bits.dtype}; pass "
                         "`words.view(np.uint32)`.")
    np.bitwise_and(bits, 0x7FFFFF, out=bits)
    np.bitwise_or(bits, 0x3F800000, out=bits)  # the float f = 1 + k 2**-23
    uniform = bits.view(np.float32)
    np.subtract(uniform, _TO_MIDPOINT, out=uniform)
    return np.log2(uniform, out=uniform)


def sample_gamma(
    concentration: float,
    shape: tuple[int, ...],
    *,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``Gamma(concentration, 1)`` samples of the given shape from ``generator``.

    ``concentration == 1`` in float32 takes the fast path ``Gamma(1, 1) = Exponential(1)``
    (:func:`standard_exponential`); other concentrations and dtypes use ``torch._standard_gamma``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_gamma(2.0, (3,), generator=g).shape
        torch.Size([3])
    """
    if not concentration > 0:
        raise ValueError(f"Expected `concentration` > 0, got {concentration!r}.")
    if concentration == 1.0 and dtype == torch.float32:
        return standard_exponential(shape, generator=generator, device=device)
    rate = torch.full(shape, float(concentration), device=device, dtype=dtype)
    return torch._standard_gamma(rate, generator=generator)


def dirichlet_weights(
    num_examples: int,
    n_tuples: int,
    alpha: float = 1.0,
    *,
    tuple_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""MultiMix weights: ``n_tuples`` columns drawn i.i.d. from ``Dirichlet(alpha * 1_m)``.

    Each column is normalised independent gammas, ``lambda_k = g_k / sum(g_k)``, ``g_ik ~ Gamma(alpha, 1)``; for
    ``alpha = 1`` those are :func:`standard_exponential`'s draws (on CPU from :data:`NUMPY_MIN_DRAWS` draws, taken
    as ``-g / log 2``: the factor cancels, and its pass is saved).

    Args:
        num_examples: ``b``, the number of examples available (rows of the result).
        n_tuples: ``n``, the number of interpolated examples.
        alpha: Dirichlet concentration (``alpha=1``: uniform on the simplex).
        tuple_size: ``m``: each column combines a random subset of ``m`` of the ``b`` examples (its other entries
            are zero). ``None`` or ``m >= b``: the whole batch.
        generator: the source of randomness (must live on ``device``).

    Returns:
        A ``(num_examples, n_tuples)`` tensor whose columns are non-negative and sum to 1.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = dirichlet_weights(4, 1000, alpha=1.0, generator=g)
        >>> w.shape
        torch.Size([4, 1000])
        >>> torch.allclose(w.sum(0), torch.ones(1000))
        True
    """
    _validate(num_examples, alpha)
    if not isinstance(n_tuples, int) or n_tuples < 1:
        raise ValueError(f"Expected `n_tuples` to be an int >= 1, got {n_tuples!r}.")
    if tuple_size is not None and (not isinstance(tuple_size, int) or tuple_size < 1):
        raise ValueError(f"Expected `tuple_size` to be None or an int >= 1, got {tuple_size!r}.")
    subset = tuple_size is not None and tuple_size < num_examples
    rows = tuple_size if subset else num_examples
    if alpha == 1.0 and dtype == torch.float32 and _numpy_way(rows * n_tuples, _device(device, generator)):
        # the bits standard_exponential would take, as -E / log 2: the factor cancels in the normalisation below, so
        # its pass over the draws is left out
        words = _sfc64_words(rows * n_tuples, generator)
        gammas = torch.from_numpy(_log2_uniform_from_bits(words)).view(rows, n_tuples)
    else:
        gammas = sample_gamma(alpha, (rows, n_tuples), generator=generator, device=device, dtype=dtype)
    if alpha != 1.0 or dtype != torch.float32:  # a column of all-zero gammas (tiny alpha) would divide 0 by 0
        gammas = gammas.clamp_min_(torch.finfo(dtype).tiny)
    gammas = gammas.div_(gammas.sum(0, keepdim=True))  # in place, as every pass over the (m, n) matrix here
    if not subset:
        return gammas
    keys = torch.rand(num_examples, n_tuples, generator=generator, device=device)
    support = keys.topk(rows, dim=0).indices
    return torch.zeros(num_examples, n_tuples, device=device, dtype=dtype).scatter_(0, support, gammas)


def mixup_pairing(
    num_examples: int,
    alpha: float = 1.0,
    *,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""The draw of mixup for one batch: ``lambda ~ Beta(alpha, alpha)`` and a random permutation of the examples.

    Example ``i`` is mixed with its partner ``partner[i]`` as ``lambda * x_i + (1 - lambda) * x_partner[i]`` (see
    :func:`~lightning_multimix.interpolation.mix_with_partner`); :func:`pair_weights` is the same draw written as a
    weight matrix. ``lambda`` is a 0-dim tensor on ``device``, drawn as ``g_1 / (g_1 + g_2)`` with
    ``g ~ Gamma(alpha, 1)`` (for ``alpha = 1``, ``Beta(1, 1)``, by ``torch.rand``: uniform on the ``2**-24`` grid of
    ``[0, 1)``), so nothing is read back to the host.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> lam, partner = mixup_pairing(5, 1.0, generator=g)
        >>> lam.shape, bool(0 <= lam <= 1), sorted(partner.tolist())
        (torch.Size([]), True, [0, 1, 2, 3, 4])
    """
    _validate(num_examples, alpha, min_examples=2)
    if alpha == 1.0:  # Beta(1, 1) is Uniform(0, 1): one operation instead of eight
        lam = torch.rand((), generator=generator, device=device, dtype=dtype)
    else:
        g = sample_gamma(alpha, (2,), generator=generator, device=device, dtype=dtype)
        lam = g[0] / g.sum().clamp_min(torch.finfo(dtype).tiny)
    partner = torch.randperm(num_examples, generator=generator, device=device)
    return lam, partner


def pair_weights(
    num_examples: int,
    alpha: float = 1.0,
    *,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Manifold-mixup weights at the last layer, as an ``(m, m)`` MultiMix-style matrix.

    As in Manifold Mixup, one ``lambda ~ Beta(alpha, alpha)`` is drawn for the batch and a random permutation ``pi``
    gives each example its partner: column ``k`` is ``lambda * e_k + (1 - lambda) * e_{pi(k)}``. It has two non-zero
    entries, or one (equal to 1) where ``pi(k) == k``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = pair_weights(5, generator=g)
        >>> w.shape, bool((w > 0).sum(0).le(2).all()), torch.allclose(w.sum(0), torch.ones(5))
        (torch.Size([5, 5]), True, True)
    """
    lam, partner = mixup_pairing(num_examples, alpha, generator=generator, device=device, dtype=dtype)
    columns = torch.arange(num_examples, device=device)
    weights = torch.zeros(num_examples, num_examples, device=device, dtype=dtype)
    weights[columns, columns] = lam
    weights.index_put_((partner, columns), (1 - lam).expand(num_examples), accumulate=True)
    return weights


def step_seed(base_seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one training step of one process, mixed from ``(base_seed, rank, step)`` (splitmix64).

    Re-seeding the generator from this at every step makes the random stream a pure function of the step: a resumed
    run draws exactly what the uninterrupted run drew, and every process draws its own weights.

    Example:
        >>> step_seed(0, 0, 1) != step_seed(0, 1, 0)
        True
    """
    state = 0
    for value in (base_seed, rank, step):
        state = _splitmix64(state + value)
    return state >> 1


def seed_uniform(seed: int) -> float:
    """A number in ``[0, 1)`` that is a pure function of ``seed``: the top 53 bits of one more splitmix64 round.

    The protocol's coin for a step (MultiMix or the other batches) comes from this rather than from a generator, so it
    costs no generator and, in a training step, about 0.04 ms less than seeding Python's ``random.Random``
    (``benchmarks/results/step_profile_before_after/``).

    Example:
        >>> u = seed_uniform(step_seed(0, 0, 7))
        >>> 0.0 <= u < 1.0, u == seed_uniform(step_seed(0, 0, 7))
        (True, True)
    """
    return (_splitmix64(seed) >> 11) * 2.0**-53


def _splitmix64(state: int) -> int:
    """One step of splitmix64 from ``state``: its output (the golden-ratio increment, then the mixing function)."""
    z = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)

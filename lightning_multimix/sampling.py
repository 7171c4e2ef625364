"""Interpolation weights: the ``m x n`` matrices that define MultiMix and its pairs baseline.

Every sampler returns a weight matrix of shape ``(m, n)`` whose columns lie on the probability simplex: column ``k``
holds the coefficients of the ``m`` examples in the ``k``-th interpolated example. A mode is a way of drawing this
matrix, nothing else. All randomness comes from an explicit :class:`torch.Generator` on the target device; torch's
global RNG is never touched.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Device = Union[torch.device, str, None]
_MASK64 = (1 << 64) - 1


def _validate(num_examples: int, alpha: float, *, min_examples: int = 1) -> None:
    if not isinstance(num_examples, int) or num_examples < min_examples:
        raise ValueError(f"Expected `num_examples` to be an int >= {min_examples}, got {num_examples!r}.")
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"Expected `alpha` > 0 (the Dirichlet/Beta concentration), got {alpha!r}. Use e.g. alpha=1.0.")


def _device(device: Device, generator: Optional[torch.Generator]) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def log_gamma(concentration: float, shape: tuple[int, ...], *, generator: Optional[torch.Generator] = None,
              device: Device = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Logarithms of ``Gamma(concentration, 1)`` draws, which stay finite for any concentration.

    Drawn as ``log G' + log(U) / a`` with ``G' ~ Gamma(a + 1, 1)`` and ``U`` uniform (``G' U^(1/a)`` is
    ``Gamma(a, 1)``): for a small ``a`` the draw itself underflows to zero, its logarithm does not.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bool(log_gamma(1e-3, (1000,), generator=g).isfinite().all())
        True
    """
    if not concentration > 0:
        raise ValueError(f"Expected `concentration` > 0, got {concentration!r}.")
    device = _device(device, generator)
    boosted = torch._standard_gamma(torch.full(shape, concentration + 1.0, device=device, dtype=dtype),
                                    generator=generator)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return boosted.log_().add_(uniform.clamp_min_(torch.finfo(dtype).tiny).log_(), alpha=1.0 / concentration)


def dirichlet_weights(
    num_examples: int,
    n_tuples: int,
    alpha: float = 1.0,
    *,
    tuple_size: Optional[int] = None,
    keep: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""MultiMix weights: ``n_tuples`` columns drawn i.i.d. from ``Dirichlet(alpha * 1_m)``.

    Each column is normalised independent gammas, ``lambda_k = g_k / sum(g_k)``, ``g_ik ~ Gamma(alpha, 1)``.

    Args:
        num_examples: ``b``, the number of examples available (rows of the result).
        n_tuples: ``n``, the number of interpolated examples.
        alpha: Dirichlet concentration (``alpha=1``: uniform on the simplex).
        tuple_size: ``m``: each column combines a random subset of ``m`` of the ``b`` examples (its other entries
            are zero). ``None`` or ``m >= b``: the whole batch.
        keep: ``(b,)`` booleans: the examples that may be mixed (the others, e.g. labels equal to an ignore index,
            get weight 0, so each column is a Dirichlet over the kept examples; a column with none is all zero).
        generator: the source of randomness (must live on ``device``).

    Returns:
        A ``(num_examples, n_tuples)`` tensor whose columns are non-negative and sum to 1.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = dirichlet_weights(4, 1000, alpha=1.0, generator=g)
        >>> w.shape, torch.allclose(w.sum(0), torch.ones(1000))
        (torch.Size([4, 1000]), True)
    """
    _validate(num_examples, alpha)
    if not isinstance(n_tuples, int) or n_tuples < 1:
        raise ValueError(f"Expected `n_tuples` to be an int >= 1, got {n_tuples!r}.")
    if tuple_size is not None and (not isinstance(tuple_size, int) or tuple_size < 1):
        raise ValueError(f"Expected `tuple_size` to be None or an int >= 1, got {tuple_size!r}.")
    device = _device(device, generator)
    subset = tuple_size is not None and tuple_size < num_examples
    rows = tuple_size if subset else num_examples
    if alpha == 1.0:
        # Gamma(1, 1) is Exponential(1), -log(1 - U): one uniform draw (torch's gamma sampler and `exponential_` are
        # several times slower on CPU); 1 - U >= 2**-24, so every draw is finite
        weights = torch.rand((rows, n_tuples), generator=generator, device=device, dtype=dtype).neg_().log1p_().neg_()
    else:  # in log space, so that a small alpha does not underflow every gamma of a column to the same zero
        logs = log_gamma(alpha, (rows, n_tuples), generator=generator, device=device, dtype=dtype)
        weights = logs.sub_(logs.amax(0, keepdim=True)).exp_()
    if subset:
        keys = torch.rand(num_examples, n_tuples, generator=generator, device=device)
        support = keys.topk(rows, dim=0).indices
        weights = torch.zeros(num_examples, n_tuples, device=device, dtype=dtype).scatter_(0, support, weights)
    if keep is not None:
        weights = weights.mul_(keep.to(device=device, dtype=dtype).unsqueeze(1))
    return weights.div_(weights.sum(0, keepdim=True).clamp_min_(torch.finfo(dtype).tiny))


def mixup_pairing(
    num_examples: int,
    alpha: float = 1.0,
    *,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""The draw of mixup for one batch: ``lambda ~ Beta(alpha, alpha)`` and a random permutation of the examples.

    Example ``i`` is mixed with its partner ``partner[i]`` as ``lambda * x_i + (1 - lambda) * x_partner[i]`` (see
    :func:`~lightning_multimix.interpolation.mix_with_partner`); :func:`pair_weights` is the same draw written as a
    weight matrix. ``lambda`` is a 0-dim tensor on the generator's device, so nothing is read back to the host.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> lam, partner = mixup_pairing(5, 1.0, generator=g)
        >>> lam.shape, bool(0 <= lam <= 1), sorted(partner.tolist())
        (torch.Size([]), True, [0, 1, 2, 3, 4])
    """
    _validate(num_examples, alpha, min_examples=2)
    device = _device(device, generator)
    if alpha == 1.0:  # Beta(1, 1) is Uniform(0, 1): one draw
        lam = torch.rand((), generator=generator, device=device, dtype=dtype)
    else:  # g_1 / (g_1 + g_2) = sigmoid(log g_1 - log g_2), in log space for small alpha
        logs = log_gamma(alpha, (2,), generator=generator, device=device, dtype=dtype)
        lam = torch.sigmoid(logs[0] - logs[1])
    partner = torch.randperm(num_examples, generator=generator, device=device)
    return lam, partner


def pair_weights(
    num_examples: int,
    alpha: float = 1.0,
    *,
    keep: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""Manifold-mixup weights at the last layer, as an ``(m, m)`` MultiMix-style matrix.

    As in Manifold Mixup, one ``lambda ~ Beta(alpha, alpha)`` is drawn for the batch and a random permutation ``pi``
    gives each example its partner: column ``k`` is ``lambda * e_k + (1 - lambda) * e_{pi(k)}``. With ``keep``,
    the rows of left-out examples are zero and each column is renormalised over the kept ones (a column with none
    becomes uniform over the kept examples).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = pair_weights(5, generator=g)
        >>> w.shape, bool((w > 0).sum(0).le(2).all()), torch.allclose(w.sum(0), torch.ones(5))
        (torch.Size([5, 5]), True, True)
    """
    lam, partner = mixup_pairing(num_examples, alpha, generator=generator, device=device, dtype=dtype)
    columns = torch.arange(num_examples, device=lam.device)
    weights = torch.zeros(num_examples, num_examples, device=lam.device, dtype=dtype)
    weights[columns, columns] = lam
    weights.index_put_((partner, columns), (1 - lam).expand(num_examples), accumulate=True)
    if keep is None:
        return weights
    mask = keep.to(weights.dtype).unsqueeze(1)
    kept = weights * mask
    total = kept.sum(0, keepdim=True)
    uniform = mask / mask.sum().clamp_min(1.0)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(dtype).tiny), uniform)


class RandomStream:
    """The random stream of a fit: a base seed and the number of training batches seen.

    Batch ``i`` of process ``r`` draws from a generator seeded with ``step_seed(base_seed, r, i)``, so the stream is
    a pure function of the batch: a run resumed from ``batches_seen`` draws what the uninterrupted run drew.

    Example:
        >>> stream = RandomStream(base_seed=0)
        >>> stream.next_batch(), stream.next_batch(), stream.batches_seen
        (0, 1, 2)
        >>> 0.0 <= stream.coin(1, rank=0) < 1.0
        True
    """

    def __init__(self, base_seed: int, batches_seen: int = 0) -> None:
        self.base_seed, self.batches_seen = base_seed, batches_seen

    def next_batch(self) -> int:
        """The index of the batch starting now."""
        self.batches_seen += 1
        return self.batches_seen - 1

    def coin(self, index: int, rank: int) -> float:
        """The protocol's coin of batch ``index`` on process ``rank``, in ``[0, 1)``."""
        return seed_uniform(step_seed(self.base_seed, rank, index))

    def seed(self, generator: torch.Generator, index: int, rank: int) -> torch.Generator:
        """``generator`` re-seeded for batch ``index`` on process ``rank``."""
        return generator.manual_seed(step_seed(self.base_seed, rank, index))


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

    The protocol's coin for a step: decided on the host, with no generator and no device read.

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

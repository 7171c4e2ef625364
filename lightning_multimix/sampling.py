"""Interpolation weights ``(m, n)``, column ``k`` on the simplex, drawn from an explicit :class:`torch.Generator`."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Device = Union[torch.device, str, None]
_MASK64 = (1 << 64) - 1


def _validate(alpha: float, minimum: int = 1, **counts: int) -> None:
    """Raise unless ``alpha > 0`` and every count is an int ``>= minimum``."""
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"Expected `alpha` > 0 (the Dirichlet/Beta concentration), got {alpha!r}. Use e.g. alpha=1.0.")
    for name, value in counts.items():
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"Expected `{name}` to be an int >= {minimum}, got {value!r}.")


def _device(device: Device, generator: Optional[torch.Generator]) -> torch.device:
    return torch.device(device if device is not None else generator.device if generator is not None else "cpu")


def _uniform(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device,
             dtype: torch.dtype) -> Tensor:
    """Uniform draws on ``[tiny, 1)``: ``torch.rand``'s, with an exact 0 made the smallest normal float."""
    return torch.empty(shape, device=device, dtype=dtype).uniform_(torch.finfo(dtype).tiny, 1.0, generator=generator)


def log_gamma(concentration: float, shape: tuple[int, ...], *, generator: Optional[torch.Generator] = None,
              device: Device = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Logarithms of ``Gamma(concentration, 1)`` draws, finite even where a small concentration's draws underflow."""
    if not concentration > 0:
        raise ValueError(f"Expected `concentration` > 0, got {concentration!r}.")
    device = _device(device, generator)
    boosted = torch._standard_gamma(torch.full(shape, concentration + 1.0, device=device, dtype=dtype),
                                    generator=generator)
    return boosted.log_().add_(_uniform(shape, generator, device, dtype).log_(), alpha=1.0 / concentration)


def dirichlet_weights(num_examples: int, n_tuples: int, alpha: float = 1.0, *, tuple_size: Optional[int] = None,
                      keep: Optional[Tensor] = None, generator: Optional[torch.Generator] = None, device: Device = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    r"""MultiMix weights ``(num_examples, n_tuples)``, columns i.i.d. ``Dirichlet(alpha * 1)`` (``alpha=1``: uniform).

    Args:
        tuple_size: ``m``: each column mixes a random subset of ``m`` examples (others zero); ``None``: all.
        keep: ``(b,)`` booleans, the examples that may be mixed (e.g. not the ignore index); the others get weight
            0, and a column with none kept is all zero.
        generator: the source of randomness (on ``device``).

    Example:
        >>> w = dirichlet_weights(4, 1000, alpha=1.0, generator=torch.Generator().manual_seed(0))
        >>> w.shape, torch.allclose(w.sum(0), torch.ones(1000))
        (torch.Size([4, 1000]), True)
    """
    _validate(alpha, num_examples=num_examples, n_tuples=n_tuples, tuple_size=1 if tuple_size is None else tuple_size)
    device = _device(device, generator)
    subset = tuple_size is not None and tuple_size < num_examples
    rows = tuple_size if subset else num_examples
    kept = keep.to(device).unsqueeze(1) if keep is not None else None
    if alpha == 1.0:
        # Gamma(1, 1) is -log U, U on [tiny, 1) so that the log is finite; the sign cancels in the normalisation
        weights = _uniform((rows, n_tuples), generator, device, dtype).log_()
    else:  # in log space, so that a small alpha does not underflow every gamma of a column to the same zero
        logs = log_gamma(alpha, (rows, n_tuples), generator=generator, device=device, dtype=dtype)
        # scaled by the largest kept draw (the left-out ones are zeroed below); clamped for a column with none kept
        top = logs if kept is None or subset else logs.masked_fill(~kept, torch.finfo(dtype).min)
        weights = logs.sub_(top.amax(0, keepdim=True)).clamp_max_(0.0).exp_()
    if subset:
        keys = torch.rand(num_examples, n_tuples, generator=generator, device=device)
        support = keys.topk(rows, dim=0).indices
        weights = torch.zeros(num_examples, n_tuples, device=device, dtype=dtype).scatter_(0, support, weights)
    if kept is None:
        return weights.div_(weights.sum(0, keepdim=True))
    weights = weights.mul_(kept)
    # a column with no kept example sums to 0 and stays 0; the others sum to at least a normal float in magnitude
    total = weights.sum(0, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    return weights.div_(total.clamp_max_(-tiny) if alpha == 1.0 else total.clamp_min_(tiny))


def mixup_pairing(num_examples: int, alpha: float = 1.0, *, generator: Optional[torch.Generator] = None,
                  device: Device = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    r"""Mixup's draw for a batch of two or more: a 0-dim ``lambda ~ Beta(alpha, alpha)`` and a partner permutation.

    Example:
        >>> lam, partner = mixup_pairing(5, 1.0, generator=torch.Generator().manual_seed(0))
        >>> lam.shape, bool(0 <= lam <= 1), sorted(partner.tolist())
        (torch.Size([]), True, [0, 1, 2, 3, 4])
    """
    _validate(alpha, minimum=2, num_examples=num_examples)
    device = _device(device, generator)
    if alpha == 1.0:  # Beta(1, 1) is Uniform(0, 1): one draw
        lam = torch.rand((), generator=generator, device=device, dtype=dtype)
    else:  # g_1 / (g_1 + g_2) = sigmoid(log g_1 - log g_2), in log space for small alpha
        logs = log_gamma(alpha, (2,), generator=generator, device=device, dtype=dtype)
        lam = torch.sigmoid(logs[0] - logs[1])
    partner = torch.randperm(num_examples, generator=generator, device=device)
    return lam, partner


def pair_weights(num_examples: int, alpha: float = 1.0, *, keep: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, device: Device = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Manifold-mixup weights ``(m, m)`` from :func:`mixup_pairing`: column ``k`` is ``lambda e_k + (1 - lambda)
    e_partner[k]``. With ``keep``, left-out rows are zero and columns renormalised (uniform over the kept if empty).

    Example:
        >>> w = pair_weights(5, generator=torch.Generator().manual_seed(0))
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
    """Batch ``i`` of process ``r`` draws from ``step_seed(base_seed, r, i)``: resumed runs draw as unbroken ones."""

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
    """A 63-bit seed for one step of one process, mixed from ``(base_seed, rank, step)`` by splitmix64."""
    state = 0
    for value in (base_seed, rank, step):
        state = _splitmix64(state + value)
    return state >> 1


def seed_uniform(seed: int) -> float:
    """A number in ``[0, 1)``, a pure function of ``seed`` computed on the host (a step's coin)."""
    return (_splitmix64(seed) >> 11) * 2.0**-53


def _splitmix64(state: int) -> int:
    z = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)

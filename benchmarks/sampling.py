"""How fast is the package's Dirichlet draw against torch's own ways of drawing the same weights?

What is measured
----------------
The ``(m, n)`` weights of MultiMix: ``n`` columns drawn from ``Dirichlet(alpha * 1_m)``, for ``alpha = 1`` (the
default) and ``alpha = 0.5``, ``m = 128``, ``n`` in 100, 1000 and 10000. Three ways, each returning an ``(m, n)``
matrix whose columns sum to one:

* ``package``: :func:`lightning_multimix.sampling.dirichlet_weights` (``alpha = 1``: ``-log1p(-U)`` from one
  ``torch.rand``, normalised; other ``alpha``: :func:`~lightning_multimix.sampling.log_gamma` in log space, then
  ``exp`` and normalised);
* ``standard_gamma``: the gamma sampler, ``torch._standard_gamma`` of an ``(m, n)`` tensor of ``alpha``, normalised;
* ``distributions.Dirichlet``: ``torch.distributions.Dirichlet(alpha * 1_m).sample((n,)).T`` (torch's global
  generator: it takes no other).

All ways run in one process, interleaved call by call (load from other processes hits them alike), one intra-op
thread, thread CPU time.

How to read the output
----------------------
``ms`` is the median over ``--repeats`` calls, ``vs package`` its ratio to the package's way at the same ``alpha``
and ``n`` (above 1: the package's way is faster). ``var / Dirichlet's`` is the variance of the weights of one more
draw over the Dirichlet's own, ``(m - 1) / (m^2 (m alpha + 1))``: about 1 for a way that draws the right
distribution (the estimate moves by a few percent at ``n = 100``).

Examples::

    python benchmarks/sampling.py                        # alpha 1 and 0.5; n = 100, 1000, 10000
    python benchmarks/sampling.py --quick --out /tmp/s   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

from benchmarks._harness import RESULTS_DIR, format_table, one_cpu_thread, write_report
from benchmarks._timing import median, time_interleaved
from lightning_multimix.sampling import dirichlet_weights

WAYS = ("package", "standard_gamma", "distributions.Dirichlet")


def ways(m: int, n: int, alpha: float) -> dict[str, Callable[[], Tensor]]:
    """The ways of drawing ``(m, n)`` Dirichlet weights, by name (:data:`WAYS`)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # distributions.Dirichlet's generator

    def standard_gamma() -> Tensor:
        gammas = torch._standard_gamma(torch.full((m, n), alpha), generator=generator)
        return gammas.div_(gammas.sum(0, keepdim=True))

    found = {
        "package": lambda: dirichlet_weights(m, n, alpha, generator=generator),
        "standard_gamma": standard_gamma,
        "distributions.Dirichlet": lambda: torch.distributions.Dirichlet(torch.full((m,), alpha)).sample((n,)).T,
    }
    assert tuple(found) == WAYS
    return found


def variance_ratio(weights: Tensor, alpha: float) -> float:
    """The variance of the weights over the Dirichlet's, ``(m - 1) / (m^2 (m alpha + 1))``."""
    m = weights.shape[0]
    return float(weights.double().var()) / ((m - 1) / (m * m * (m * alpha + 1)))


def results_dir(out: Optional[str], quick: bool) -> str:
    """Where the results file goes: ``--out`` when given, else :data:`RESULTS_DIR`; a quick run's nowhere (``""``),
    so that a smoke run never replaces the recorded results."""
    if out is not None:
        return out
    return "" if quick else str(RESULTS_DIR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--n", default="100,1000,10000")
    parser.add_argument("--alpha", default="1,0.5")
    parser.add_argument("--repeats", type=int, default=100, help="interleaved calls per way, after 3 warm-up calls")
    parser.add_argument("--out", default=None,
                        help=f"where sampling.md goes (default {RESULTS_DIR}; with --quick, nowhere unless given)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 calls per way, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    info = one_cpu_thread()
    rows = []
    for alpha in (float(v) for v in args.alpha.split(",")):
        for n in (int(v) for v in args.n.split(",")):
            candidates = ways(args.m, n, alpha)
            for name, draw in candidates.items():
                weights = draw()
                if weights.shape != (args.m, n) or not torch.allclose(weights.sum(0), torch.ones(n), atol=1e-4):
                    raise AssertionError(f"{name}: not {args.m} x {n} weights with columns on the simplex")
            times = time_interleaved(candidates, torch.device("cpu"), args.repeats)
            package = median(times["package"])
            rows += [[f"{alpha:g}", f"{args.m} x {n}", name, f"{median(times[name]):.3f}",
                      f"{median(times[name]) / package:.2f}", f"{variance_ratio(draw(), alpha):.2f}"]
                     for name, draw in candidates.items()]
    table = format_table(("alpha", "m x n", "way", "ms", "vs package", "var / Dirichlet's"), rows,
                         title="== Dirichlet weights, one thread, thread CPU time, medians, interleaved ==")
    print(table + "\n")
    settings = f"m={args.m}, n={args.n}, alpha={args.alpha}, {args.repeats} interleaved calls per way after 3 warm-up"
    out = results_dir(args.out, args.quick)
    if not out:
        print("a quick run writes no results file unless --out is given")
    write_report(out, "sampling.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

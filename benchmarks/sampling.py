"""Which way of drawing the Dirichlet(1) weights is fastest, and does any of them warm up slowly?

What is measured
----------------
The ``(m, n)`` weights of MultiMix for ``alpha = 1`` are normalised Exponential(1) draws. Candidates, each followed
by the same in-place column normalisation: the package's way (:func:`lightning_multimix.sampling.dirichlet_weights`,
:func:`~lightning_multimix.sampling.standard_exponential`: ``-log(U)`` with, for large draws on CPU, ``U = 2 - f``,
``f`` a float in ``[1, 2)`` whose 23 mantissa bits are raw bits from NumPy's SFC64 seeded from the torch generator,
else ``U`` from ``torch.rand``), each of those two sources alone (``-log(torch.rand)`` was the package's way before),
``-log1p(-U)``, ``Tensor.exponential_`` and ``torch.distributions.Dirichlet``. ``n = 16`` shows small draws, where
seeding NumPy's generator costs more than it saves, ``n = 512`` (``2**16`` draws) the crossover. Each candidate runs
in a fresh process (a slow start shows: the first calls of a process are timed apart from the steady state), one
intra-op thread, thread CPU time.

How to read the output
----------------------
``first 100`` is the median of a fresh process's first 100 calls, ``steady`` the median of calls 300 to 500;
``vs package`` the steady ratio to the package's way. All candidates draw the same distribution (NumPy's bits
put ``U`` on the ``2**-23`` grid, ``torch.rand`` on the ``2**-24`` grid).

Example::

    python benchmarks/sampling.py                 # m = 128; n = 16, 512, 1000 and 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import format_table, machine_info, print_machine, write_report

CANDIDATES = ("package", "SFC64 bits", "-log(torch.rand)", "-log1p(-U)", "exponential_", "distributions.Dirichlet")


def _child(candidate: str, m: int, n: int) -> None:
    import torch

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    tiny = torch.finfo(torch.float32).tiny

    def draw() -> torch.Tensor:
        from lightning_multimix import sampling

        if candidate == CANDIDATES[0]:
            return sampling.dirichlet_weights(m, n, 1.0, generator=generator)
        if candidate in CANDIDATES[1:3]:
            source = "numpy" if candidate == CANDIDATES[1] else "torch"
            g = sampling.standard_exponential((m, n), generator=generator, source=source)
        elif candidate == CANDIDATES[3]:
            g = torch.rand((m, n), generator=generator).neg_().log1p_().neg_().clamp_min_(tiny)
        elif candidate == CANDIDATES[4]:
            g = torch.empty((m, n)).exponential_(generator=generator)
        else:
            return torch.distributions.Dirichlet(torch.ones(m)).sample((n,)).T
        return g.div_(g.sum(0, keepdim=True))

    times = []
    for _ in range(500):
        start = time.thread_time_ns()
        draw()
        times.append((time.thread_time_ns() - start) / 1e6)
    print(json.dumps(times))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--n", default="16,512,1000,10000")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(CANDIDATES[int(args.child[0])], int(args.child[1]), int(args.child[2]))
        return 0
    info = machine_info("cpu")
    print_machine(info)
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        results = {}
        for index, candidate in enumerate(CANDIDATES):
            done = subprocess.run([sys.executable, __file__, "--child", str(index), str(args.m), str(n)],
                                  capture_output=True, text=True, check=True)
            times = json.loads(done.stdout.strip().splitlines()[-1])
            results[candidate] = (sorted(times[:100])[50], sorted(times[300:])[100])
        package = results[CANDIDATES[0]][1]
        rows += [[f"{args.m} x {n}", name, f"{first:.3f}", f"{steady:.3f}", f"{steady / package:.2f}"]
                 for name, (first, steady) in results.items()]
    table = format_table(("m x n", "candidate", "first 100 (ms)", "steady (ms)", "vs package"), rows,
                         title="== Dirichlet(1) weights, one thread, thread CPU time, medians ==")
    print(table)
    write_report(args.out, "sampling.md", info, f"m={args.m}, n={args.n}, 500 calls per fresh process", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which way of drawing the Dirichlet(1) weights is fastest, and does any of them warm up slowly?

What is measured
----------------
The ``(m, n)`` weights of MultiMix for ``alpha = 1`` are normalised Exponential(1) draws. Candidates, each followed
by the same in-place column normalisation: the package's way (:func:`lightning_multimix.sampling.dirichlet_weights`,
:func:`~lightning_multimix.sampling.standard_exponential`: for draws of ``NUMPY_MIN_DRAWS`` or more on CPU, raw bits
from NumPy's SFC64 seeded from the torch generator, made into ``U`` on the midpoints of the ``2**-23`` grid and
``-log(U)`` by NumPy's vectorised ``log2``, else ``-log(torch.rand)``), each of those two ways alone, ``SFC64 bits,
torch.log`` (the package's way before: ``-log(2 - f)`` with the same bits and ``torch.log``), ``-log1p(-U)``,
``Tensor.exponential_``, ``torch.distributions.Dirichlet``, and ``SFC64 raw bits alone``: the generator's bits and
nothing made of them (no draw, no normalisation), the floor of NumPy's way. ``n = 32`` and ``64`` show the crossover
of NumPy's way for small draws (seeding its generator costs a fixed few microseconds): below ``NUMPY_MIN_DRAWS =
2**13`` draws ``torch.rand`` is faster. Each candidate runs in a fresh process (a slow start shows: the first calls
of a process are timed apart from the steady state), one intra-op thread, thread CPU time.

How to read the output
----------------------
``first 100`` is the median of a fresh process's first 100 calls, ``steady`` the median of calls 300 to 500, each
the median over ``--processes`` fresh processes (the same code varies by up to 20% from one process to the next
here, with where its memory lands); ``vs package`` the steady ratio to the package's way, which is ``SFC64 bits,
NumPy log2`` from ``128 x 64`` on and ``-log(torch.rand)`` below. All candidates draw the same distribution (``U`` on a
``2**-23`` or ``2**-24`` grid).

Example::

    python benchmarks/sampling.py                 # m = 128; n = 32, 64, 1000 and 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import RESULTS_DIR, format_table, machine_info, print_machine, write_report

CANDIDATES = ("package", "SFC64 bits, NumPy log2", "-log(torch.rand)", "SFC64 bits, torch.log", "-log1p(-U)",
              "exponential_", "distributions.Dirichlet", "SFC64 raw bits alone")


def _child(candidate: str, m: int, n: int) -> None:
    import numpy as np
    import torch

    from lightning_multimix import sampling

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    tiny = torch.finfo(torch.float32).tiny

    def normalised(g: torch.Tensor) -> torch.Tensor:
        return g.div_(g.sum(0, keepdim=True))

    def exponential(source: str) -> torch.Tensor:
        return sampling.standard_exponential((m, n), generator=generator, source=source)

    def previous() -> torch.Tensor:  # the package's way before: torch's log of U = 2 - f, from the same bits
        words = torch.from_numpy(sampling._sfc64_words(m * n, generator).view(np.int32)).view(m, n)
        f = words.bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000).view(torch.float32)
        return normalised(f.neg_().add_(2.0).log_().neg_())

    ways = {
        "package": lambda: sampling.dirichlet_weights(m, n, 1.0, generator=generator),
        "SFC64 bits, NumPy log2": lambda: normalised(exponential("numpy")),
        "-log(torch.rand)": lambda: normalised(exponential("torch")),
        "SFC64 bits, torch.log": previous,
        "-log1p(-U)": lambda: normalised(torch.rand((m, n), generator=generator).neg_().log1p_().neg_()
                                         .clamp_min_(tiny)),
        "exponential_": lambda: normalised(torch.empty((m, n)).exponential_(generator=generator)),
        "distributions.Dirichlet": lambda: torch.distributions.Dirichlet(torch.ones(m)).sample((n,)).T,
        # the floor of NumPy's way: the generator's bits, nothing made of them
        "SFC64 raw bits alone": lambda: sampling._sfc64_words(m * n, generator),
    }
    assert tuple(ways) == CANDIDATES
    draw = ways[candidate]

    times = []
    for _ in range(500):
        start = time.thread_time_ns()
        draw()
        times.append((time.thread_time_ns() - start) / 1e6)
    print(json.dumps(times))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--n", default="32,64,1000,10000")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per candidate and n")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(CANDIDATES[int(args.child[0])], int(args.child[1]), int(args.child[2]))
        return 0
    info = machine_info("cpu")
    print_machine(info)
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in CANDIDATES}
        for _ in range(args.processes):  # rounds over the candidates: load and memory placement hit them alike
            for index, candidate in enumerate(CANDIDATES):
                done = subprocess.run([sys.executable, __file__, "--child", str(index), str(args.m), str(n)],
                                      capture_output=True, text=True, check=True)
                times = json.loads(done.stdout.strip().splitlines()[-1])
                results[candidate].append((statistics.median(times[:100]), statistics.median(times[300:])))
        medians = {name: tuple(statistics.median(v) for v in zip(*runs)) for name, runs in results.items()}
        package = medians[CANDIDATES[0]][1]
        rows += [[f"{args.m} x {n}", name, f"{first:.3f}", f"{steady:.3f}", f"{steady / package:.2f}"]
                 for name, (first, steady) in medians.items()]
    table = format_table(("m x n", "candidate", "first 100 (ms)", "steady (ms)", "vs package"), rows,
                         title="== Dirichlet(1) weights, one thread, thread CPU time, medians over processes ==")
    print(table)
    settings = f"m={args.m}, n={args.n}, 500 calls per fresh process, {args.processes} processes per candidate"
    write_report(args.out, "sampling.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

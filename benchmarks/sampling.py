"""Which way of drawing the Dirichlet(1) weights is fastest, and does any of them warm up slowly?

What is measured
----------------
The ``(m, n)`` weights of MultiMix for ``alpha = 1`` are normalised Exponential(1) draws. Candidates, each followed
by the same in-place column normalisation: the package's way (:func:`lightning_multimix.sampling.dirichlet_weights`,
:func:`~lightning_multimix.sampling.standard_exponential`: for draws of ``NUMPY_MIN_DRAWS`` or more on CPU, raw bits
from NumPy's SFC64 seeded from the torch generator, made into ``U`` on the midpoints of the ``2**-23`` grid and
``log2(U)`` by NumPy's vectorised ``log2``, normalised as is: the factor ``-log 2`` of ``-log(U)`` cancels, else
``-log(torch.rand)``), each of those two ways alone (``SFC64 bits, NumPy log2`` with its factor), ``SFC64 seeded
anew`` (the same, with a new NumPy bit generator seeded from one torch draw at every call: the package's way before
it kept one per thread and re-seeded it), ``SFC64 bits, torch.log`` (the same bits, ``-log(2 - f)`` by
``torch.log``), ``-log1p(-U)``, ``Tensor.exponential_``, ``torch.distributions.Dirichlet``, and ``SFC64 raw bits
alone``: the generator's bits and nothing made of them (no draw, no normalisation), the floor of NumPy's way.
``n = 100`` and ``500`` show where NumPy's way stops paying for small draws: in a loop it is faster at every ``n``
here, but right after a network's step (the ``after a step`` column) its code runs cold and ``torch.rand`` is faster
below ``NUMPY_MIN_DRAWS = 2**16`` draws. Each candidate runs in a fresh
process (a slow start shows: the first calls of a process are timed apart from the steady state), one intra-op
thread, thread CPU time. Then 100 more calls, each right after a forward and backward pass of a small CNN on a batch
of 128 (the demo's ``SmallCNN``, width 8): where the draw runs in training, with caches and the allocator full of
the network's work.

How to read the output
----------------------
``first 100`` is the median of a fresh process's first 100 calls, ``steady`` the median of calls 300 to 500,
``after a step`` the median of the calls that follow a network's step, each the median over ``--processes`` fresh
processes (the same code varies by up to 20% from one process to the next here, with where its memory lands); ``vs
package`` the ratios to the package's way, steady and after a step, which is ``SFC64 bits, NumPy log2`` (less its
last pass) from ``128 x 512`` (``NUMPY_MIN_DRAWS``) on and ``-log(torch.rand)`` below. All candidates draw the same
distribution (``U`` on a ``2**-23`` or ``2**-24`` grid).

Example::

    python benchmarks/sampling.py                 # m = 128; n = 100, 500, 1000 and 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import RESULTS_DIR, format_table, machine_info, print_machine, run_child, write_report

CANDIDATES = ("package", "SFC64 bits, NumPy log2", "SFC64 seeded anew", "-log(torch.rand)", "SFC64 bits, torch.log",
              "-log1p(-U)", "exponential_", "distributions.Dirichlet", "SFC64 raw bits alone")


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

    def torch_log() -> torch.Tensor:  # torch's log of U = 2 - f, from the same bits
        words = torch.from_numpy(sampling._sfc64_words(m * n, generator).view(np.int32)).view(m, n)
        f = words.bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000).view(torch.float32)
        return normalised(f.neg_().add_(2.0).log_().neg_())

    def seeded_anew() -> torch.Tensor:  # the package's way before: a new bit generator for every draw
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator, dtype=torch.int64)) & (2**64 - 1)
        words = np.random.SFC64(seed).random_raw((m * n + 1) // 2).view(np.uint32)[:m * n]
        return normalised(torch.from_numpy(sampling.exponential_from_bits(words)).view(m, n))

    ways = {
        "package": lambda: sampling.dirichlet_weights(m, n, 1.0, generator=generator),
        "SFC64 bits, NumPy log2": lambda: normalised(exponential("numpy")),
        "SFC64 seeded anew": seeded_anew,
        "-log(torch.rand)": lambda: normalised(exponential("torch")),
        "SFC64 bits, torch.log": torch_log,
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
    from lightning_multimix.demo.models import SmallCNN  # the demo's network (a benchmark may import the demo)

    net = SmallCNN(10, 1, width=8)
    images, labels = torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,))
    after_step = []
    for _ in range(100):
        torch.nn.functional.cross_entropy(net(images), labels).backward()
        start = time.thread_time_ns()
        draw()
        after_step.append((time.thread_time_ns() - start) / 1e6)
    print(json.dumps({"times": times, "after_step": after_step}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--n", default="100,500,1000,10000")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per candidate and n")
    parser.add_argument("--candidates", default=";".join(CANDIDATES),
                        help="which to run, names separated by ';' (the package's way always runs)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(CANDIDATES[int(args.child[0])], int(args.child[1]), int(args.child[2]))
        return 0
    names = args.candidates.split(";")
    if set(names) - set(CANDIDATES):
        parser.error(f"--candidates: unknown {sorted(set(names) - set(CANDIDATES))}; among {CANDIDATES}")
    chosen = [CANDIDATES[0]] + [c for c in CANDIDATES[1:] if c in names]
    info = machine_info("cpu")
    info["torch_threads"] = "1"  # in the measuring processes (this one only starts them)
    print_machine(info)
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
        for _ in range(args.processes):  # rounds over the candidates: load and memory placement hit them alike
            for candidate in chosen:
                index = CANDIDATES.index(candidate)
                found = run_child(__file__, index, args.m, n)
                times = found["times"]
                results[candidate].append((statistics.median(times[:100]), statistics.median(times[300:]),
                                           statistics.median(found["after_step"])))
        medians = {name: tuple(statistics.median(v) for v in zip(*runs)) for name, runs in results.items()}
        _, package, package_after = medians[CANDIDATES[0]]
        rows += [[f"{args.m} x {n}", name, f"{first:.3f}", f"{steady:.3f}", f"{after:.3f}",
                  f"{steady / package:.2f}", f"{after / package_after:.2f}"]
                 for name, (first, steady, after) in medians.items()]
    table = format_table(("m x n", "candidate", "first 100 (ms)", "steady (ms)", "after a step (ms)", "vs package",
                          "after a step"), rows,
                         title="== Dirichlet(1) weights, one thread, thread CPU time, medians over processes ==")
    print(table)
    settings = (f"m={args.m}, n={args.n}, 500 calls then 100 after a network's step per fresh process, "
                f"{args.processes} processes per candidate")
    write_report(args.out, "sampling.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
